"""Notices libraries log while they are imported that say nothing to a sidecar user, dropped by text.

transformers imports torchao whenever it is installed (its quantizers), so every process that
loads a model logs these, not only one that quantizes (`quantize.py`):
- torchao: its optional kernels built for GPUs or CUDA versions this machine lacks
  (`Failed to load .../_C_mxfp8...so`, `_C_cutlass_90a`);
- torch: the deprecation of registering Enum types with pytree, which torchao still does;
- diffusers: torchao's older tensor types are gone, which matters only to checkpoints pickled
  with torchao (sidecar loads safetensors only).
Each is matched by its logger and its text, so every other warning or error of these libraries
still shows. The CLI and the test session drop them before anything imports diffusers.
"""

from __future__ import annotations

import logging

# logger name -> substrings of the messages to drop
IMPORT_NOTICES: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class _DropNotices(logging.Filter):
    """Drops a logger's records whose message holds one of `texts`."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_import_notices() -> None:
    """Drop `IMPORT_NOTICES` from now on; call before diffusers or transformers is imported.
    Calling it again adds nothing."""
    for name, texts in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropNotices) for existing in logger.filters):
            logger.addFilter(_DropNotices(texts))
