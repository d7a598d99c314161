"""`model.quantize`: the backbone's Linear weights stored in 8 bits, computed in the run dtype.

The library: torchao's int8 weight-only quantization (`Int8WeightOnlyConfig`), applied
after the base loads on the CPU, so the GPU never holds the bf16 backbone. Why torchao:
- PEFT knows its quantized Linear (`peft.tuners.lora.torchao.TorchaoLoraLinear`): a
  LoRA loads onto it through diffusers' own `load_lora_weights`, its A/B matrices stay
  in the run dtype, and the in-place swap of the next checkpoint copies into them as
  before. diffusers' layerwise fp8 casting does not: PEFT casts the LoRA matrices to the
  fp8 storage dtype of the layer they wrap, and the first step fails
  (`"mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'`, diffusers 0.42.1 /
  peft 0.21.2). optimum-quanto, what ai-toolkit's `qfloat8` uses, has no PEFT layer.
- One scale per output row keeps int8 weights within ~0.4 % of bf16, closer than fp8
  without scales; ai-toolkit offers torchao's int8 as `qtype: int8` (`toolkit/util/quantize.py`).
- it is PyTorch's own library, and diffusers' offload modes move its tensors as any other.

ai-toolkit's named types all mean "store the backbone smaller" to a user; sidecar stores
8 bits for each of them, and says so once for the 2-4-bit ones (more memory than the
trainer uses, never less quality). Text encoders and the VAE stay in the run dtype.
"""

from __future__ import annotations

import logging
import warnings

import torch

from sidecar.render.model_sizes import INT8, quantization_type

__all__ = ["INT8", "is_quantized", "quantization_type", "quantize_backbone", "stored_bytes"]

logger = logging.getLogger("sidecar.render")


def quantize_backbone(module: torch.nn.Module, qtype: str) -> torch.nn.Module:
    """Store `module`'s Linear weights as int8 with one scale per row (torchao), in place.

    Call before a LoRA is applied: PEFT then wraps the quantized Linear and keeps the
    LoRA's own matrices unquantized.
    """
    if qtype != INT8:
        raise ValueError(f"`qtype` must be {INT8!r}, got {qtype!r}")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig())
    # PEFT's note that merging needs torchao's config: sidecar never merges a LoRA.
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    return module


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes `module`'s parameters and buffers hold, counting a quantized tensor's parts
    (int8 data, scales, zero points), not the size it reports."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        flatten = getattr(data, "__tensor_flatten__", None)
        if callable(flatten) and type(data) is not torch.Tensor:
            names, _context = flatten()
            total += sum(getattr(data, part).numel() * getattr(data, part).element_size() for part in names)
        else:
            total += data.numel() * data.element_size()
    return total


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any weight of `module` is a torchao quantized tensor."""
    return any("torchao" in type(p.data).__module__ for p in module.parameters())
