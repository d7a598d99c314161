"""The memory plan of a loaded pipeline: the same arithmetic as `sidecar check`, from its modules.

`--offload auto` plans from the modules as loaded (dtype, quantization and separate files
already applied) rather than reading the files again: their names, shapes and dtypes are
what the safetensors headers hold, so both plans agree (`tests/render/test_memory_plan.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from sidecar.arch import arch_from_pipeline_class
from sidecar.render.devices import free_cuda_cache
from sidecar.render.memory_plan import MemoryPlan, choose, plan_from_tensors
from sidecar.render.model_sizes import BACKBONE, COMPONENTS
from sidecar.weights import TensorInfo


def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's components that are torch modules (tokenizers and schedulers are not)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


_TORCH_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_RUN_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def plan_pipeline(
    pipe: Any, *, quantize: str | None = None, low_vram: bool = False, **options: Any
) -> MemoryPlan | None:
    """The memory plan of a loaded pipeline, from its modules' names, shapes and dtypes.

    The same arithmetic as `sidecar check` on the files' headers (`options`: those of
    `plan_from_tensors`); None for a pipeline of an architecture sidecar does not know.
    """
    arch = arch_from_pipeline_class(type(pipe).__name__)
    if arch is None:
        return None
    modules = module_components(pipe)
    found = {}
    for name in COMPONENTS[arch]:
        module = modules.get(name)
        if module is None:
            continue
        tensors, seen = {}, set()
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) not in seen:  # tied weights (T5's `shared`, `embed_tokens`) are stored once
                seen.add(id(value))
                tensors[key] = TensorInfo(
                    _TORCH_DTYPE_NAMES.get(value.dtype, "F32"), tuple(value.shape), (0, 0)
                )
        found[name] = (tensors, f"loaded {type(module).__name__}")
    backbone = next(name for name, role in COMPONENTS[arch].items() if role == BACKBONE)
    dtype = _RUN_DTYPES.get(getattr(modules.get(backbone), "dtype", None), "fp32")
    return plan_from_tensors(arch, found, dtype=dtype, quantize=quantize, low_vram=low_vram, **options)


def plan_for_card(plan: MemoryPlan, device: torch.device) -> MemoryPlan:
    """`plan` with the mode chosen for the free memory of the CUDA card `device`."""
    free_cuda_cache(device)  # what an OOM or the detached weights left in torch's cache
    free_bytes, _total = torch.cuda.mem_get_info(device)
    return choose(plan, free_bytes, label=str(device))
