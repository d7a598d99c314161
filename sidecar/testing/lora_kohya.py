"""kohya sd-scripts LoRA files: `lora_unet_` / `lora_te<N>_` prefixes, flattened names, `.alpha`.

Key names read from sd-scripts (github.com/kohya-ss/sd-scripts):
- `networks/lora.py`: `lora_unet_` + the UNet module path with `.` -> `_`; SDXL's UNet is
  `library/sdxl_original_unet.py` (SGM names, `input_blocks_4_1_…`); text encoders
  `lora_te1_` (CLIP-L) and `lora_te2_` (CLIP-G), `text_model_encoder_layers_N_…`;
- `networks/lora_sd3.py`: `LORA_PREFIX_SD3 = "lora_unet"` over `SingleDiTBlock` children of
  `library/sd3_models.py` (`joint_blocks_N_x_block_attn_qkv`…), `lora_te1/2/3_`;
- `networks/lora_flux.py`: `LORA_PREFIX_FLUX = "lora_unet"` over `DoubleStreamBlock` and
  `SingleStreamBlock` (`double_blocks_N_img_attn_qkv`, `single_blocks_N_linear1`…),
  `lora_te1_` (CLIP-L) and `lora_te3_` (T5-XXL, `train_t5xxl`). With `split_qkv` each of
  q, k, v (and linear1's MLP part) trains its own rank-r LoRA, and `state_dict()` saves them
  merged: downs stacked (rank 3r or 4r), ups block-diagonal, one `.alpha`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sidecar.testing.lora_layouts import Layout, sd3_swapped
from sidecar.testing.lora_plan import Factors, Target, WrittenLora, fused_shape, lora_tensors, save

KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
FLUX_TEXT_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}  # CLIP-L, T5-XXL


def kohya_key(prefix: str, name: str) -> str:
    return f"{prefix}_{name.replace('.', '_')}"


def text_encoder_name(name: str) -> str:
    """kohya's text-encoder module path: transformers 4 put CLIP's layers under `text_model.`."""
    return f"text_model.{name}" if name.startswith("encoder.layers.") else name


def write_kohya(
    path: Path,
    layout: Layout,
    shapes: dict[str, dict[str, tuple[int, ...]]],
    *,
    component: str,
    rank: int,
    alpha: float,
    factors: Factors,
    text_layers: dict[str, list[str]] | None = None,
    text_prefixes: dict[str, str] = KOHYA_TEXT_PREFIXES,
    split_fused: bool = False,
    swapped=lambda original: False,
    metadata: dict[str, str] | None = None,
) -> WrittenLora:
    """One LoRA per layout entry of the denoiser (fused rows together), then text-encoder layers.

    `split_fused` writes sd-scripts' `split_qkv` save: a rank-`rank` LoRA per fused part, merged
    into stacked downs and block-diagonal ups under the fused name.
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[Target, ...]] = {}
    denoiser = shapes[component]
    for original, layers in layout:
        key = kohya_key("lora_unet", original)
        targets = tuple(Target(component, layer, swap_halves=swapped(original)) for layer in layers)
        if split_fused and len(layers) > 1:
            down, up = _merged_split(layers, denoiser, rank, factors)
        else:
            down, up = factors.lora(fused_shape(denoiser, layers), rank)
        tensors.update(lora_tensors(key, down, up, alpha=alpha))
        modules[key] = targets
    for text_component, names in (text_layers or {}).items():
        for name in names:
            key = kohya_key(text_prefixes[text_component], text_encoder_name(name))
            down, up = factors.lora(shapes[text_component][name], rank)
            tensors.update(lora_tensors(key, down, up, alpha=alpha))
            modules[key] = (Target(text_component, name),)
    return WrittenLora(save(tensors, path, metadata), modules, metadata or {})


def _merged_split(
    layers: list[str], shapes: dict[str, tuple[int, ...]], rank: int, factors: Factors
) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' merge of split-qkv LoRAs: downs stacked, ups on the block diagonal."""
    pairs = [factors.lora(shapes[layer], rank) for layer in layers]
    down = torch.cat([pair[0] for pair in pairs])
    up = torch.zeros(sum(shapes[layer][0] for layer in layers), rank * len(layers))
    row = 0
    for index, (layer, (_, part)) in enumerate(zip(layers, pairs, strict=True)):
        up[row : row + shapes[layer][0], index * rank : (index + 1) * rank] = part
        row += shapes[layer][0]
    return down, up


def sd3_swap_rule(shapes: dict[str, tuple[int, ...]]):
    return lambda original: sd3_swapped(original, shapes)
