"""Error types. Each message says what is wrong, where, and what to do about it.

The daemon catches `SidecarError` per job, records its message and goes on; anything
else escaping a job is a bug in sidecar, logged with its traceback.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error a user can act on."""


class ConfigError(SidecarError):
    """A trainer config is unreadable or holds a bad value.

    `location` is `file:line yaml.path` (as much of it as is known) and is put in
    front of the message, so the user can jump straight to the key.
    """

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, yaml_path: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.yaml_path = yaml_path
        self.reason = message
        super().__init__(f"{self.location} {message}" if self.location else message)

    @property
    def location(self) -> str:
        where = self.file or ""
        if self.file and self.line is not None:
            where = f"{self.file}:{self.line}"
        if self.yaml_path:
            where = f"{where} {self.yaml_path}:" if where else f"{self.yaml_path}:"
        elif where:
            where = f"{where}:"
        return where


class ModelError(SidecarError):
    """The base model cannot be found or loaded: names the file and the config key.

    `key` is the `model:` key that points to the file (`name_or_path`, `vae_path`...);
    the caller that knows the config puts its `file:line yaml.path:` in front (`located`).
    """

    def __init__(self, detail: str, *, key: str) -> None:
        self.detail = detail
        self.key = key
        super().__init__(f"`model.{key}` {detail}")

    def located(self, where: str) -> ModelError:
        """The same error, located: `where` is e.g. `train.yaml:9 config.process[0].model.vae_path:`."""
        error = ModelError(self.detail, key=self.key)
        error.args = (f"{where} {self.detail}",)
        return error


class CheckpointError(SidecarError):
    """A checkpoint file is not a usable LoRA: corrupt, truncated, pickle, not a LoRA."""


class LoraError(SidecarError):
    """A LoRA does not apply to the loaded base model (wrong architecture, no layer matched)."""


class SamplerError(SidecarError):
    """A sampler name is unknown or not valid for the architecture."""


class TransientError(SidecarError):
    """Worth retrying later: a file still busy, CUDA out of memory."""
