"""LyCORIS files (LoKr, LoHa, LoCon), written by the `lycoris-lora` library as trainers use it.

- SimpleTuner (`lora_type: lycoris`; github.com/bghira/SimpleTuner,
  `simpletuner/helpers/training/trainer.py`): `LycorisNetwork.apply_preset(apply_preset)`, then
  `create_lycoris(transformer, multiplier, linear_dim, linear_alpha, **config)` on the
  diffusers model, saved with `save_weights`: keys `lycoris_<diffusers path with _>.lokr_w1`….
  Its documented config (`documentation/LYCORIS.md`): `algo: lokr`, `linear_dim: 10000` (both
  Kronecker factors full, so the scale is 1 and the saved alpha is 10000), `linear_alpha: 1`,
  `factor` 10 on `Attention` and 4 on `FeedForward` modules.
- kohya sd-scripts with LyCORIS (`--network_module lycoris.kohya`, `lycoris/kohya.py`):
  `lora_unet_` over `Transformer2DModel`, `ResnetBlock2D`, `Downsample2D`, `Upsample2D` of
  sd-scripts' SGM UNet (conv layers included), `lora_te1_` / `lora_te2_` for the text encoders.
  The factors are the library's; only the names differ, so these are written on the diffusers
  UNet and renamed to the SGM layout.

The factors are random (a trained adapter), scaled so each layer's change is visible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sidecar.testing.lora_plan import Target, WrittenLora, save

# LycorisNetwork class settings a preset changes; restored after writing.
PRESET_ATTRIBUTES = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)
DELTA_STD = 0.3  # each layer's change, relative to 1/sqrt(fan_in)


def write_lycoris(
    path: Path,
    module: torch.nn.Module,
    *,
    component: str,
    preset: dict,
    algo: str,
    linear_dim: int,
    linear_alpha: float,
    seed: int,
    scale: float = 1.0,
    rename: Callable[[str], str] | None = None,
    keep: Callable[[str], bool] = lambda name: True,
    **algo_options,
) -> WrittenLora:
    """A LyCORIS network on `module` with random factors, saved as the library saves it.

    `rename` maps a module path to the trainer's key prefix (default: LyCORIS' own
    `lycoris_<path>`); `keep` chooses the modules written; `algo_options` go to the network
    (`factor`, `conv_dim`, `full_matrix`…).
    """
    from lycoris.wrapper import LycorisNetwork

    saved = {name: getattr(LycorisNetwork, name) for name in PRESET_ATTRIBUTES}
    try:
        LycorisNetwork.apply_preset(preset)
        network = LycorisNetwork(
            module,
            multiplier=1.0,
            lora_dim=linear_dim,
            alpha=linear_alpha,
            conv_lora_dim=algo_options.pop("conv_dim", linear_dim),
            conv_alpha=algo_options.pop("conv_alpha", linear_alpha),
            network_module=algo,
            **algo_options,
        )
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)
    paths = {
        f"{LycorisNetwork.LORA_PREFIX}_{name}".replace(".", "_"): name for name, _ in module.named_modules()
    }
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[Target, ...]] = {}
    for lora in network.loras:
        name = paths[lora.lora_name]
        if not keep(name):
            continue
        _randomize(lora, generator, scale)
        key = rename(name) if rename else lora.lora_name
        for suffix, tensor in lora.state_dict().items():
            tensors[f"{key}.{suffix}"] = tensor.detach().clone()
        modules[key] = (Target(component, name),)
    return WrittenLora(save(tensors, path), modules)


@torch.no_grad()
def _randomize(lora: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    """Standard-normal factors, the first rescaled so the layer's change has a set size.

    The change's spread follows from the factor shapes (a sum over the rank of products of
    normal entries), so no weight is built here.
    """
    factors = dict(lora.named_parameters())
    for parameter in factors.values():
        parameter.copy_(torch.randn(parameter.shape, generator=generator))
    fan_in = int(torch.tensor(lora.shape[1:]).prod())
    first = next(iter(factors.values()))
    first.mul_(scale * DELTA_STD * fan_in**-0.5 / (_delta_spread(factors) * float(lora.scale)))


def _delta_spread(factors: dict[str, torch.Tensor]) -> float:
    """Standard deviation of a module's unscaled change when all its factors are standard normal."""
    if "hada_w1_a" in factors:  # (w1a @ w1b) * (w2a @ w2b): each product has variance rank
        return float(factors["hada_w1_b"].shape[0])
    if "lokr_w1" in factors or "lokr_w1_a" in factors:  # kron(w1, w2), a factor maybe w_a @ w_b
        spread = 1.0
        for index in (1, 2):
            if f"lokr_w{index}_a" in factors:
                spread *= factors[f"lokr_w{index}_a"].shape[1] ** 0.5
        return spread
    return factors["lora_down.weight"].shape[0] ** 0.5  # LoCon: up @ down
