"""LoRA files in every format the trainers write, for any saved model (tiny or wide).

`write_trainer_lora(model_folder, arch, path, lora_format)` writes one file in the trainer's
own key names and returns a `WrittenLora` that says which diffusers layers each module of the
file covers. The formats, per architecture, and where each writer reads its key names:

| format | writer module | trainer |
|---|---|---|
| `peft` | `lora_others` | ai-toolkit, SimpleTuner (`standard`), diffusers' scripts |
| `kohya`, `kohya_sgm`, `kohya_split_qkv`, `kohya_te` | `lora_kohya` | kohya sd-scripts |
| `comfyui` | `lora_others` | OneTrainer's COMFY output, ComfyUI's own prefix |
| `onetrainer_legacy`, `onetrainer_omi`, `onetrainer` | `lora_onetrainer` | OneTrainer |
| `lycoris_*` (LoKr, LoHa, LoCon) | `lora_lycoris` | SimpleTuner `lycoris`, sd-scripts + LyCORIS |
| `eridiffusion` | `lora_others` | EriDiffusion |
"""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.testing.lora_kohya import FLUX_TEXT_PREFIXES, sd3_swap_rule, write_kohya
from sidecar.testing.lora_layouts import flux_bfl_layout, sd3_original_layout, sgm_layout
from sidecar.testing.lora_lycoris import write_lycoris
from sidecar.testing.lora_onetrainer import write_onetrainer
from sidecar.testing.lora_others import write_comfyui, write_eridiffusion, write_peft
from sidecar.testing.lora_plan import Factors, WrittenLora, module_shapes

TRAINER_FORMATS: dict[str, tuple[str, ...]] = {
    "sdxl": (
        "peft",
        "kohya",
        "kohya_sgm",
        "onetrainer_legacy",
        "lycoris_locon",
        "lycoris_loha",
        "lycoris_lokr",
        "eridiffusion",
    ),
    "sd3": ("peft", "kohya", "onetrainer_legacy", "lycoris_lokr", "lycoris_loha"),
    "flux": (
        "peft",
        "kohya",
        "kohya_split_qkv",
        "kohya_te",
        "comfyui",
        "onetrainer_legacy",
        "onetrainer_omi",
        "onetrainer",
        "lycoris_lokr_full",
        "lycoris_lokr_lowrank",
        "eridiffusion",
    ),
}
DENOISER = {"sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
TEXT_ENCODERS = {
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
}

# The denoiser layers trainers train by default (regexes on diffusers names).
TRAINED = {
    "flux": r"^(transformer_blocks|single_transformer_blocks)\.\d+\.",
    "sd3": r"^transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear)$",
    "sdxl": r"attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$",
}
SDXL_CONVS = r"(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(down|up)samplers\.0\.conv)$"
TEXT_TRAINED = (
    r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12]|SelfAttention\.[qkvo]|DenseReluDense\.w\w+)$"
)

# SimpleTuner's documented LoKr config (documentation/LYCORIS.md), with diffusers 0.42's Flux
# attention class for SimpleTuner's own `Attention` (same children, same names).
SIMPLETUNER_LOKR = {
    "target_module": ["Attention", "FluxAttention", "FeedForward"],
    "module_algo_map": {
        "Attention": {"factor": 10},
        "FluxAttention": {"factor": 10},
        "FeedForward": {"factor": 4},
    },
}
# A third of the SDXL layers LyCORIS wraps, from every UNet level: what a LoHa costs per
# denoising step on CPU grows with them (it rebuilds each changed weight per call).
SDXL_LYCORIS_KEPT = r"(resnets\.0\.|samplers\.0\.|attentions\.0\.)"
KOHYA_LYCORIS = {"target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]}


def write_trainer_lora(
    model_folder: str | Path,
    arch: str,
    path: str | Path,
    lora_format: str,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 1,
    scale: float = 1.0,
) -> WrittenLora:
    """Write a LoRA for the model in `model_folder` as the trainer of `lora_format` writes it.

    `alpha` defaults to half the rank (a scale of 0.5, so a converter that drops alpha shows).
    """
    if lora_format not in TRAINER_FORMATS.get(arch, ()):
        raise ValueError(
            f"`lora_format` for {arch} must be one of {TRAINER_FORMATS.get(arch, ())}, got {lora_format!r}"
        )
    path = Path(path)
    alpha = rank / 2 if alpha is None else float(alpha)
    denoiser = DENOISER[arch]
    shapes = {
        component: module_shapes(model_folder, component) for component in (denoiser, *TEXT_ENCODERS[arch])
    }
    trained = sorted(name for name in shapes[denoiser] if re.search(TRAINED[arch], name))
    texts = {
        component: sorted(name for name in shapes[component] if re.search(TEXT_TRAINED, name))
        for component in TEXT_ENCODERS[arch]
    }
    factors = Factors(seed, scale=scale)
    options = {"rank": rank, "alpha": alpha, "factors": factors}
    identity = [(name, [name]) for name in trained]

    if lora_format == "peft":
        return write_peft(path, arch, {denoiser: trained}, shapes, **options)
    if lora_format == "comfyui":
        return write_comfyui(path, flux_bfl_layout(shapes[denoiser]), shapes[denoiser], **options)
    if lora_format == "eridiffusion":
        return write_eridiffusion(path, arch, shapes[denoiser], **options)
    if lora_format.startswith("kohya"):
        return _write_kohya(path, arch, lora_format, shapes, identity, texts, options)
    if lora_format.startswith("onetrainer"):
        layout = {"onetrainer_legacy": "legacy", "onetrainer_omi": "omi", "onetrainer": "diffusers"}[
            lora_format
        ]
        layers = {denoiser: trained}
        if layout != "diffusers":
            layers.update(texts)
        omi = flux_bfl_layout(shapes[denoiser]) if layout == "omi" else None
        return write_onetrainer(path, layers, shapes, layout=layout, omi_layout=omi, **options)
    return _write_lycoris(
        path, model_folder, arch, lora_format, shapes, rank=rank, alpha=alpha, seed=seed, scale=scale
    )


def _write_kohya(path, arch, lora_format, shapes, identity, texts, options) -> WrittenLora:
    denoiser = DENOISER[arch]
    if arch == "sdxl":
        if lora_format == "kohya_sgm":
            names = [name for name, _ in identity]
            return write_kohya(
                path,
                sgm_layout(shapes[denoiser], names),
                shapes,
                component=denoiser,
                text_layers=texts,
                **options,
            )
        return write_kohya(path, identity, shapes, component=denoiser, **options)
    if arch == "sd3":
        layout = sd3_original_layout(shapes[denoiser])
        swapped = sd3_swap_rule(shapes[denoiser])
        return write_kohya(
            path, layout, shapes, component=denoiser, text_layers=texts, swapped=swapped, **options
        )
    layout = flux_bfl_layout(shapes[denoiser])
    text_layers = texts if lora_format == "kohya_te" else None
    return write_kohya(
        path,
        layout,
        shapes,
        component=denoiser,
        text_layers=text_layers,
        text_prefixes=FLUX_TEXT_PREFIXES,
        split_fused=lora_format == "kohya_split_qkv",
        **options,
    )


def _write_lycoris(path, model_folder, arch, lora_format, shapes, *, rank, alpha, seed, scale) -> WrittenLora:
    denoiser = DENOISER[arch]
    module = _load_denoiser(model_folder, arch)
    common = {"component": denoiser, "seed": seed, "scale": scale}
    if arch == "sdxl":
        names = sorted(
            name for name in shapes[denoiser] if ".attentions." in name or re.search(SDXL_CONVS, name)
        )
        sgm = dict((layers[0], original) for original, layers in sgm_layout(shapes[denoiser], names))
        algo = lora_format.removeprefix("lycoris_")
        return write_lycoris(
            path,
            module,
            preset=KOHYA_LYCORIS,
            algo="locon" if algo == "locon" else algo,
            linear_dim=rank,
            linear_alpha=alpha,
            rename=lambda name: "lora_unet_" + sgm[name].replace(".", "_"),
            keep=lambda name: re.search(SDXL_LYCORIS_KEPT, name) is not None,
            factor=8,
            **common,
        )
    if lora_format == "lycoris_lokr_full":  # SimpleTuner's documented config
        return write_lycoris(
            path, module, preset=SIMPLETUNER_LOKR, algo="lokr", linear_dim=10000, linear_alpha=1, **common
        )
    if lora_format == "lycoris_lokr_lowrank":
        return write_lycoris(
            path, module, preset=SIMPLETUNER_LOKR, algo="lokr", linear_dim=rank, linear_alpha=alpha, **common
        )
    algo = lora_format.removeprefix("lycoris_")
    return write_lycoris(
        path,
        module,
        preset=SIMPLETUNER_LOKR,
        algo=algo,
        linear_dim=rank,
        linear_alpha=alpha,
        factor=8,
        **common,
    )


def _load_denoiser(model_folder: str | Path, arch: str):
    """The denoiser's structure on the meta device: LyCORIS needs its layers' shapes, not weights."""
    import diffusers
    import torch

    model_class = {
        "sdxl": "UNet2DConditionModel",
        "sd3": "SD3Transformer2DModel",
        "flux": "FluxTransformer2DModel",
    }
    cls = getattr(diffusers, model_class[arch])
    config = cls.load_config(Path(model_folder) / DENOISER[arch])
    with torch.device("meta"):
        return cls.from_config(config)
