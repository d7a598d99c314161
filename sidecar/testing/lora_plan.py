"""What a written LoRA file targets, and the random factors every trainer writer shares.

Each trainer writer (`lora_kohya.py`, `lora_onetrainer.py`, `lora_lycoris.py`,
`lora_others.py`) names the model's layers its own way and fuses some of them. Besides the
file it returns a `WrittenLora`: for each module key in the file, the diffusers layers its
rows cover, in order. That is all a test needs to build the merged-weights reference from
the file's own tensors, independently of any converter: the writer chose the diffusers
layers first and named them in the trainer's layout second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass(frozen=True)
class Target:
    """One diffusers layer that a file's module covers (a row block of a fused module)."""

    component: str  # unet | transformer | text_encoder | text_encoder_2 | text_encoder_3
    module: str  # the layer's name in that component, e.g. `transformer_blocks.0.attn.to_q`
    swap_halves: bool = False  # the original layout stores the two modulation chunks swapped


@dataclass(frozen=True)
class WrittenLora:
    """A LoRA file and, per module key in it, the diffusers layers its rows cover in order."""

    path: Path
    modules: dict[str, tuple[Target, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def targets(self) -> list[Target]:
        return [target for targets in self.modules.values() for target in targets]


def module_shapes(model_folder: str | Path, component: str) -> dict[str, tuple[int, ...]]:
    """`{layer name: weight shape}` of a saved component's linear and conv layers (header only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted((Path(model_folder) / component).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.endswith(".weight"):
                    shape = tuple(handle.get_slice(key).get_shape())
                    if len(shape) in (2, 4):
                        shapes[key.removesuffix(".weight")] = shape
    return shapes


def linear_shapes(model_folder: str | Path, component: str) -> dict[str, tuple[int, int]]:
    """`{layer name: (out_features, in_features)}` of a saved component's 2-D weights (header only)."""
    shapes = module_shapes(model_folder, component)
    return {name: (shape[0], shape[1]) for name, shape in shapes.items() if len(shape) == 2}


def random_factors(
    shape: tuple[int, int], *, rank: int, generator: torch.Generator, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, in], up [out, rank]) for a Linear of `shape`: down at 1/sqrt(in), up at `scale`."""
    out_features, in_features = shape
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) * scale
    return down, up


def fused_shape(shapes: dict[str, tuple[int, ...]], modules: list[str]) -> tuple[int, ...]:
    """The weight shape of `modules` stacked along their rows (a fused qkv, linear1...)."""
    first = shapes[modules[0]]
    return (sum(shapes[module][0] for module in modules), *first[1:])


class Factors:
    """Seeded random LoRA / LyCORIS factors: a trained adapter (up is not zero), visible in images."""

    def __init__(self, seed: int, *, scale: float = 1.0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = scale

    def normal(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def lora(self, shape: tuple[int, ...], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) for a weight of `shape`: conv downs keep the kernel, conv ups are 1x1."""
        out_features, in_features, *kernel = shape
        fan_in = in_features * int(torch.tensor(kernel).prod()) if kernel else in_features
        down = self.normal(rank, in_features, *kernel, std=fan_in**-0.5)
        up = self.normal(out_features, rank, *([1, 1] if kernel else []), std=self.scale * rank**-0.5)
        return down, up


def save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata or {})
    return path


def lora_tensors(
    key: str, down: torch.Tensor, up: torch.Tensor, *, alpha: float | None, style: str = "kohya"
) -> dict[str, torch.Tensor]:
    """One module's tensors: `kohya` (lora_down / lora_up) or `peft` (lora_A / lora_B) names."""
    down_name, up_name = ("lora_down", "lora_up") if style == "kohya" else ("lora_A", "lora_B")
    tensors = {f"{key}.{down_name}.weight": down, f"{key}.{up_name}.weight": up}
    if alpha is not None:
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def peft_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """`{component: lora_alpha}` from diffusers' `lora_adapter_metadata` header entry."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    values = json.loads(raw)
    return {
        key.rsplit(".", 1)[0]: float(value) for key, value in values.items() if key.endswith(".lora_alpha")
    }
