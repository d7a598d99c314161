"""LoRA weights for the text encoders diffusers' pipeline loaders skip, and the model's layer widths.

diffusers 0.42's Flux and SD 3.5 loaders take LoRA weights for `text_encoder` (and SD 3.5's
`text_encoder_2`) only: T5 weights (kohya's `lora_te3_`, OneTrainer's `lora_te2_` / `t5.` on
Flux) load as a silent no-op. sidecar injects those with PEFT itself, alpha already folded
(scale 1), and scales them with the strength where the pipeline's `encode_prompt` does not.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.peft_utils import delete_adapter_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from sidecar.render.offload import NETWORK_ATTRIBUTE

# Text encoders whose LoRA scale the pipelines' `encode_prompt` sets (SDXL, SD 3.5 and Flux in
# diffusers 0.42); SD 3.5's T5 (`text_encoder_3`) is not among them.
PIPELINE_SCALED_ENCODERS = ("text_encoder", "text_encoder_2")


def skipped_encoders(
    converted: dict[str, torch.Tensor], pipeline_class: type[DiffusionPipeline], pipe: DiffusionPipeline
) -> dict[str, dict[str, torch.Tensor]]:
    """Converted LoRA weights, per component, of text encoders the pipeline's loader skips."""
    loadable = set(getattr(pipeline_class, "_lora_loadable_modules", ()))
    skipped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in converted.items():
        component = key.split(".", 1)[0]
        if component not in loadable and isinstance(getattr(pipe, component, None), torch.nn.Module):
            skipped.setdefault(component, {})[key] = value
    return skipped


def inject_encoder_lora(
    pipe: DiffusionPipeline, component: str, weights: dict[str, torch.Tensor], adapter_name: str
) -> torch.nn.Module:
    """Inject one text encoder's LoRA with PEFT: one rank per layer, alpha = rank (folded)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    encoder = getattr(pipe, component)
    part = {key.removeprefix(f"{component}."): value for key, value in weights.items()}
    ranks = {
        key.removesuffix(".lora_B.weight"): value.shape[1]
        for key, value in part.items()
        if key.endswith(".lora_B.weight")
    }
    rank = next(iter(ranks.values()))
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={f"^{name}$": value for name, value in ranks.items()},
        alpha_pattern={f"^{name}$": value for name, value in ranks.items()},
    )
    inject_adapter_in_model(config, encoder, adapter_name=adapter_name)
    set_peft_model_state_dict(encoder, part, adapter_name=adapter_name)
    return encoder


def set_encoder_strength(encoders: dict[str, torch.nn.Module], strength: float, adapter_name: str) -> None:
    """The strength of injected encoders that the pipeline's `encode_prompt` does not scale."""
    for name, encoder in encoders.items():
        if name in PIPELINE_SCALED_ENCODERS:
            continue
        for module in encoder.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {}):
                module.set_scale(adapter_name, strength)


def remove_encoder_lora(encoder: torch.nn.Module, adapter_name: str) -> None:
    delete_adapter_layers(encoder, adapter_name)
    configs = getattr(encoder, "peft_config", None)
    if isinstance(configs, dict):  # PEFT keeps it; the next injection would warn of two adapters
        configs.pop(adapter_name, None)
        if not configs:
            del encoder.peft_config


def layer_widths(component: torch.nn.Module) -> dict[str, int]:
    """`{layer: out features}` of a component's linear and conv layers, seen through adapter wrappers."""
    widths: dict[str, int] = {}
    for name, module in component.named_modules():
        if ".base_layer" in f".{name}." or ".lora_" in f".{name}" or NETWORK_ATTRIBUTE in name:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, torch.nn.Linear):
            widths[name] = base.out_features
        elif isinstance(base, torch.nn.Conv2d):
            widths[name] = base.out_channels
    return widths
