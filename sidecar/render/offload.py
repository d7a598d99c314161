"""The hooks the offload modes put on a pipeline's modules, and taking them off again.

diffusers' model and sequential offload are accelerate hooks (`_hf_hook`); its group offload is
diffusers' own hook registry (`_diffusers_hook`). `memory.py` chooses and applies the modes; this
module finds and removes their hooks, brings the weights back to CPU RAM, holds modules out of
every mode, and keeps a network hung on a component (a LyCORIS network) where its layers run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sidecar.render.loaded_plan import module_components

logger = logging.getLogger("sidecar.render")

# diffusers 0.42 has no public way to remove group offloading; these are the hook
# names `diffusers.hooks.group_offloading` registers (checked against 0.42.1).
_GROUP_OFFLOAD_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
# Where a LyCORIS network hangs on the component whose layers it wraps (`adapters/lycoris.py`): as
# a submodule it follows `.to()`, model offload and group offload with its component.
NETWORK_ATTRIBUTE = "sidecar_lycoris"


def has_group_offload(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading hooks sit anywhere in `module`."""
    return any(
        registry is not None and any(name in registry.hooks for name in _GROUP_OFFLOAD_HOOK_NAMES)
        for registry in (getattr(m, "_diffusers_hook", None) for m in module.modules())
    )


def _remove_group_offload(module: torch.nn.Module) -> None:
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in _GROUP_OFFLOAD_HOOK_NAMES:
            registry.remove_hook(name, recurse=False)


def detach(pipe: Any) -> None:
    """Remove every offload hook and bring all weights back to CPU RAM.

    `remove_all_hooks` undoes model and sequential offload (accelerate puts the weights
    kept aside under sequential offload back in place); group offload hooks are
    removed one registry at a time, as diffusers 0.42 has no public call for it.
    """
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    for module in module_components(pipe).values():
        if has_group_offload(module):
            _remove_group_offload(module)
    pipe.to("cpu")


def hold_modules(pipe: Any, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Take `names` out of the pipeline (set to None), on the CPU: no offload mode sees them.

    diffusers' pipelines take prompt embeddings without their text encoders, and
    `_execution_device` then looks only at the components that run on the card.
    """
    held = {}
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            held[name] = unhook(module)
            setattr(pipe, name, None)
    if held:
        logger.info("%s wait in CPU RAM and encode there (memory plan)", ", ".join(held))
    return held


def unhook(module: torch.nn.Module) -> torch.nn.Module:
    """`module` without offload hooks (accelerate's, diffusers' group offload), in CPU RAM.

    A held text encoder must encode where it is: a hook left on it would move it to the card.
    """
    from accelerate.hooks import remove_hook_from_module

    if any(hasattr(sub, "_hf_hook") for sub in module.modules()):
        remove_hook_from_module(module, recurse=True)
    if has_group_offload(module):
        _remove_group_offload(module)
    return module.to("cpu")


def keep_networks_on(pipe: Any, device: torch.device) -> None:
    """Under sequential offload, each network hung on a component stays unhooked on `device`.

    accelerate hooks every layer, but LyCORIS calls its modules from the wrapped layer's own
    `forward`, past their hooks: hooked, they would compute from the meta tensors accelerate
    leaves in place of the weights. A LoRA's factors are small; `detach` brings them back.
    """
    from accelerate.hooks import remove_hook_from_module

    for module in module_components(pipe).values():
        network = module._modules.get(NETWORK_ATTRIBUTE)
        if network is not None:
            remove_hook_from_module(network, recurse=True)  # puts the weights back in place
            network.to(device)
