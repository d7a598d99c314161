"""A simulated trainer: evolving LoRA checkpoints written the way real trainers write them.

It behaves as real trainers do where it matters to sidecar: it writes each checkpoint in
place and in chunks (a reader can see half a file), names them in its layout, lets the
LoRA evolve (rising `scale`), prunes old checkpoints like ai-toolkit's
`max_step_saves_to_keep`, and ends with a final file. The demo runs it beside the daemon;
the fault tests drive it with every trainer layout sidecar recognises.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from sidecar.arch import Arch
from sidecar.intake.cache import content_hash
from sidecar.testing.loras import write_lora

logger = logging.getLogger("sidecar.testing")

TrainerLayout = Literal["ai-toolkit", "kohya", "onetrainer", "diffusers", "eridiffusion"]
TRAINER_LAYOUTS: tuple[TrainerLayout, ...] = (
    "ai-toolkit",
    "kohya",
    "onetrainer",
    "diffusers",
    "eridiffusion",
)

DEMO_NAME = "demo_lora"
DEMO_TRIGGER = "sks"
DEMO_SIZE_PIXELS = 64
DEMO_SAMPLE_STEPS = 4
DEMO_SAVE_EVERY_STEPS = 100
DEMO_KEEP_CHECKPOINTS = 2  # like ai-toolkit's max_step_saves_to_keep
DEMO_PROMPTS = (
    "a photo of [trigger] on a beach",
    "[trigger] as an oil painting --d 7",
    "a pencil sketch of [trigger], detailed",
)
CHUNKS_PER_FILE = 4  # writes per checkpoint file
CHUNK_PAUSE_SECONDS = 0.05  # between two writes of one file: a reader sees it half written
SAVE_PAUSE_SECONDS = 1.0  # between two checkpoints ("training")
ONETRAINER_TIMESTAMP = "%Y-%m-%d_%H-%M-%S"

# The key format each trainer writes an SDXL LoRA in (other architectures: PEFT).
SDXL_FORMATS: dict[TrainerLayout, str] = {
    "ai-toolkit": "kohya",
    "kohya": "kohya_sgm",
    "onetrainer": "kohya",
    "diffusers": "peft",
    "eridiffusion": "peft",
}
ERIDIFFUSION_MODEL_NAMES: dict[str, str] = {"sdxl": "sdxl", "sd3": "sd35", "flux": "flux"}


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What the simulated trainer wrote: where, at which step, and the bytes' SHA-256."""

    path: Path
    step: int
    content_hash: str
    is_final: bool = False


@dataclass
class SimulatedTrainer:
    """Writes evolving LoRA checkpoints into `output_dir` the way a trainer does.

    `before_prune` is called with each checkpoint about to be deleted; tests use it to
    decide when the deletion happens. `run` is meant for a thread: an exception is kept
    in `error` and `done` is set in any case.
    """

    model_folder: Path
    output_dir: Path
    arch: Arch = "sdxl"
    layout: TrainerLayout = "ai-toolkit"
    name: str = DEMO_NAME
    steps: Sequence[int] = (100, 200, 300)
    final_step: int | None = None  # the final file's step in its metadata; None: no final
    final_has_step_metadata: bool = True
    keep_last: int | None = None  # prune older checkpoints; None keeps all
    chunks: int = CHUNKS_PER_FILE
    chunk_pause_seconds: float = CHUNK_PAUSE_SECONDS
    save_pause_seconds: float = SAVE_PAUSE_SECONDS
    start_delay_seconds: float = 0.0
    before_prune: Callable[[WrittenCheckpoint], None] = lambda written: None
    written: list[WrittenCheckpoint] = field(default_factory=list)
    pruned: list[WrittenCheckpoint] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def checkpoint_path(self, step: int) -> Path:
        """Where this trainer layout saves step `step`."""
        if self.layout == "ai-toolkit":
            return self.output_dir / f"{self.name}_{step:09d}.safetensors"
        if self.layout == "kohya":
            return self.output_dir / f"{self.name}-step{step:08d}.safetensors"
        if self.layout == "onetrainer":
            stamp = time.strftime(ONETRAINER_TIMESTAMP, time.localtime())
            return self.output_dir / "save" / f"{self.name}{stamp}-save-{step}-0-{step}.safetensors"
        if self.layout == "diffusers":
            return self.output_dir / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors"
        model = ERIDIFFUSION_MODEL_NAMES[self.arch]
        return self.output_dir / f"checkpoint-{step}" / f"{model}_lora.safetensors"

    def final_path(self) -> Path:
        if self.layout == "diffusers":
            return self.output_dir / "pytorch_lora_weights.safetensors"
        if self.layout == "eridiffusion":
            return self.output_dir / f"{ERIDIFFUSION_MODEL_NAMES[self.arch]}_lora_final.safetensors"
        return self.output_dir / f"{self.name}.safetensors"

    @property
    def lora_format(self) -> str:
        return SDXL_FORMATS[self.layout] if self.arch == "sdxl" else "peft"

    def lora_bytes(self, step: int, staging: Path, *, with_metadata: bool) -> bytes:
        """A LoRA whose weights grow with the step, as training makes them."""
        metadata = {"training_info": json.dumps({"step": step, "epoch": 0})} if with_metadata else None
        if metadata and self.layout == "kohya":
            metadata = {"ss_steps": str(step), "ss_epoch": "0"}
        path = write_lora(
            self.model_folder,
            self.arch,
            staging / f"{step}.safetensors",
            lora_format=self.lora_format,  # type: ignore[arg-type]
            seed=1,
            scale=step / 200,  # visibly stronger at every save, as a LoRA learning its subject
            metadata=metadata,
        )
        data = path.read_bytes()
        path.unlink()
        return data

    def write_in_place(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` in `chunks` writes with pauses, as `torch.save` to a slow disk does."""
        path.parent.mkdir(parents=True, exist_ok=True)
        piece = max(1, -(-len(data) // self.chunks))
        with path.open("wb") as handle:
            for start in range(0, len(data), piece):
                handle.write(data[start : start + piece])
                handle.flush()
                if start + piece < len(data):
                    time.sleep(self.chunk_pause_seconds)

    def _save(self, step: int, path: Path, data: bytes, *, is_final: bool) -> WrittenCheckpoint:
        self.write_in_place(path, data)
        if self.layout == "eridiffusion" and not is_final:  # its marker comes last
            state = {"global_step": step, "epoch": 0}
            (path.parent / "training_state.json").write_text(json.dumps(state), encoding="utf-8")
        written = WrittenCheckpoint(path, step, content_hash(path), is_final=is_final)
        self.written.append(written)
        logger.info("trainer saved %s", path)
        return written

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        saved = [w for w in self.written if not w.is_final and w not in self.pruned]
        for old in saved[: max(len(saved) - self.keep_last, 0)]:
            self.before_prune(old)
            if old.path.parent.name.startswith("checkpoint-"):
                shutil.rmtree(old.path.parent, ignore_errors=True)
            else:
                old.path.unlink(missing_ok=True)
            self.pruned.append(old)
            logger.info("trainer pruned %s", old.path)

    def run(self) -> None:
        try:
            time.sleep(self.start_delay_seconds)
            with tempfile.TemporaryDirectory(prefix="sidecar-trainer-") as staging_name:
                staging = Path(staging_name)
                for number, step in enumerate(self.steps):
                    if number:
                        time.sleep(self.save_pause_seconds)
                    data = self.lora_bytes(step, staging, with_metadata=True)
                    self._save(step, self.checkpoint_path(step), data, is_final=False)
                    self._prune()
                if self.final_step is not None:
                    time.sleep(self.save_pause_seconds)
                    data = self.lora_bytes(
                        self.final_step, staging, with_metadata=self.final_has_step_metadata
                    )
                    self._save(self.final_step, self.final_path(), data, is_final=True)
        except BaseException as error:  # kept for the caller; a thread cannot raise to it
            self.error = error
            logger.exception("simulated trainer failed")
        finally:
            self.done.set()


def write_trainer_config(
    path: Path,
    *,
    model_folder: Path,
    training_folder: Path,
    name: str = DEMO_NAME,
    arch: Arch = "sdxl",
    prompts: Sequence[str] = DEMO_PROMPTS,
    size_pixels: int = DEMO_SIZE_PIXELS,
    sample_steps: int = DEMO_SAMPLE_STEPS,
    save_every: int = DEMO_SAVE_EVERY_STEPS,
    keep_checkpoints: int = DEMO_KEEP_CHECKPOINTS,
    trigger_word: str = DEMO_TRIGGER,
) -> Path:
    """An ai-toolkit-shaped config (`job: extension`, `config.process[]`) for the tiny model."""
    flag = {"sdxl": "is_xl", "sd3": "is_v3", "flux": "is_flux"}[arch]
    document = {
        "job": "extension",
        "config": {
            "name": name,
            "process": [
                {
                    "type": "sd_trainer",
                    "training_folder": str(training_folder),
                    "device": "cuda:0",
                    "trigger_word": trigger_word,
                    "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
                    "save": {
                        "dtype": "float32",
                        "save_every": save_every,
                        "max_step_saves_to_keep": keep_checkpoints,
                    },
                    "model": {"name_or_path": str(model_folder), flag: True},
                    "sample": {
                        "sampler": "flowmatch" if arch != "sdxl" else "euler",
                        "sample_every": save_every,
                        "width": size_pixels,
                        "height": size_pixels,
                        "prompts": list(prompts),
                        "neg": "",
                        "seed": 42,
                        "walk_seed": True,
                        "guidance_scale": 4,
                        "sample_steps": sample_steps,
                    },
                }
            ],
        },
        "meta": {"name": "[name]", "version": "1.0"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path
