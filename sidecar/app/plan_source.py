"""The trainer config and its sample plan as the daemon holds them: read again when the file changes.

The intake loop (`sidecar.app.intake_loop`) stores each new checkpoint with the plan as it is
then; the dispatcher reads its output options from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sidecar.errors import SidecarError
from sidecar.intake.layouts import Checkpoint
from sidecar.intake.split import file_signature
from sidecar.plan.build import build_plan
from sidecar.plan.config import TrainerConfig, load_trainer_config
from sidecar.plan.request import SamplePlan, SampleRequest

logger = logging.getLogger("sidecar.intake")


class PlanSource:
    """The trainer config and its sample plan, read again when the file changes.

    The plan's per-step parts are applied per checkpoint: `requests_for` puts in the seeds a
    trainer draws anew at every step, `cadence_skip` says which checkpoints a trainer's
    cadence in epochs or time (or a first step) leaves out, timing from the last one it let
    through.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        process: int | str | None = None,
        prompts_file: Path | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.process = process
        self.prompts_file = prompts_file
        self.config: TrainerConfig = load_trainer_config(self.config_path, process=process)
        self.plan: SamplePlan = build_plan(self.config, prompts_file=prompts_file)
        self._last_due: float | None = None  # when the cadence last let a checkpoint through
        self._signature = self._files_signature()

    def _files_signature(self) -> tuple[int | None, ...]:
        """The config, and the prompt file the command line or the config names."""
        prompts = self.prompts_file if self.prompts_file is not None else self.config.prompts_file
        files = [self.config_path]
        if prompts is not None and Path(prompts).resolve() != self.config.path:  # OneTrainer: inline
            files.append(Path(prompts))
        return tuple((file_signature(path) or (None, None))[1] for path in files)

    def requests_for(self, checkpoint: Checkpoint) -> tuple[SampleRequest, ...]:
        """The requests to store with `checkpoint`: per-step seeds made concrete for its step."""
        return self.plan.requests_for_step(checkpoint.step)

    def cadence_skip(self, checkpoint: Checkpoint, now: float) -> str | None:
        """Why the trainer's cadence in epochs or time, or its first sampled step, leaves
        `checkpoint` out, or None when it renders (then the next time interval starts at `now`)."""
        cadence = self.plan.cadence
        if cadence is None:
            return None
        reason = cadence.skip_reason(
            step=checkpoint.step,
            epoch=checkpoint.epoch,
            is_final=checkpoint.is_final,
            seconds_since_last=None if self._last_due is None else now - self._last_due,
        )
        if reason is None:
            self._last_due = now
        return reason

    def reload_if_changed(self) -> bool:
        """A changed `sample:` section applies to checkpoints added from now on."""
        signature = self._files_signature()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            config = load_trainer_config(self.config_path, process=self.process)
            plan = build_plan(config, prompts_file=self.prompts_file)
        except SidecarError as error:
            logger.error("config changed but is not valid, keeping the previous sample plan: %s", error)
            return True
        if (config.arch, config.model.name_or_path) != (self.config.arch, self.config.model.name_or_path):
            logger.warning(
                "config now names base model %s (%s); the loaded %s stays until sidecar restarts",
                config.model.name_or_path,
                config.arch,
                self.config.model.name_or_path,
            )
        self.config, self.plan = config, plan
        logger.info(
            "config reloaded: %s sample(s) per checkpoint, for checkpoints added from now on",
            len(plan.requests),
        )
        return True
