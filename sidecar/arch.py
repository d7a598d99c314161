"""What sidecar knows of each architecture without importing torch or diffusers.

Config parsing, the sample plan, `sidecar check` and the memory plan need the defaults,
the detection markers and the components below; they must stay fast and work without a
model loaded, so these facts live here and the renderers in `sidecar/render/` read them.
Adding an architecture is one `ArchSpec` here, one renderer file, one registry line and
a tiny builder in `sidecar/testing/`.

Defaults (steps, guidance) are those of the trainer example configs users start from
(ai-toolkit's `config/examples/` and its UI's per-model defaults), else the model's own
diffusers pipeline defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arch = Literal[
    "sdxl",
    "sd3",
    "flux",
    "sd15",
    "chroma",
    "flux_kontext",
    "flux2",
    "flux2_klein",
    "qwen_image",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "zimage",
    "wan",
]
# How `guidance_scale` acts: classifier-free guidance (the negative prompt always runs), Flux's
# embedded (distilled) guidance, or true CFG (a negative pass at `guidance_scale`, Qwen-Image's
# `true_cfg_scale`).
GuidanceKind = Literal["cfg", "embedded", "true_cfg"]

# The role of each pipeline component in the memory plan.
BACKBONE = "backbone"
TEXT_ENCODER = "text encoder"
VAE = "vae"

GIB = 1024**3


@dataclass(frozen=True)
class Workload:
    """Working memory per phase, bf16, one image (the memory plan scales it by dtype and batch).

    Estimates from the activations alive at once in the widest layer (tokens x widths x 2 bytes),
    rounded up; `bench/gpu_check.sh` measures them against a real card.
    """

    denoise_bytes_per_mp: int  # one denoising step at 1 MP; CFG's doubled batch included
    decode_bytes_per_mp: int  # the VAE decode of 1 MP, untiled
    encode_bytes: int  # one prompt through the largest text encoder


@dataclass(frozen=True)
class ArchSpec:
    """Per-architecture facts. Sizes in pixels."""

    name: Arch
    label: str
    size_multiple: int  # width and height must be multiples of this (VAE factor x patch size)
    default_size: int
    default_steps: int
    default_guidance: float
    default_sampler: str
    is_flow_model: bool  # rectified-flow models take only flow-matching samplers
    guidance: GuidanceKind
    pipeline_classes: tuple[str, ...]  # diffusers `model_index.json` `_class_name` values
    # Substrings of tensor names in a single-file checkpoint; `single_file_order` breaks ties
    # where one family's names contain another's (Chroma's blocks are Flux's).
    single_file_markers: tuple[str, ...]
    components: tuple[tuple[str, str], ...]  # (pipeline component, BACKBONE / TEXT_ENCODER / VAE)
    workload: Workload
    text_encoder_keys: tuple[tuple[str, str], ...] = ()  # `model:` key of a separate file -> component
    # Single-file checkpoints: tensor-name prefix -> component, first match wins; "" takes the rest.
    single_file_prefixes: tuple[tuple[str, str], ...] = (("", "transformer"),)
    default_repo: str = ""  # where diffusers takes what a single file lacks (read from the cache only)
    control_images: int = 0  # reference images a sample may carry (`ctrl_img`, `--ci`); 0: none
    true_cfg: bool = False  # takes `true_cfg_scale`: a negative pass beside the embedded guidance (Flux)
    # The key-name groups (`LORA_KEY_MARKERS`) of the LoRA files this architecture takes; the
    # loader then checks shapes. Flux.2's trainers write BFL's block names, which are Flux.1's.
    lora_groups: tuple[str, ...] = ()

    def takes_lora_of(self, group: str) -> bool:
        """Whether a LoRA whose key names are those of `group` may go on this model."""
        return group in (self.lora_groups or (self.name,))

    default_height: int | None = None  # where the reference size is not square; None: `default_size`
    # Video models: a frame count is 1 + a multiple of the VAE's temporal factor; 0: images only.
    frame_step: int = 0
    default_fps: int = 16  # a video sample's fps when neither the sample nor the config names one


SDXL = ArchSpec(
    name="sdxl",
    label="Stable Diffusion XL",
    size_multiple=8,
    default_size=1024,
    default_steps=20,
    default_guidance=7.0,
    default_sampler="euler_a",
    is_flow_model=False,
    guidance="cfg",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    single_file_markers=("conditioner.embedders.1.model.", "label_emb.0.0.weight"),
    components=(
        ("unet", BACKBONE),
        ("text_encoder", TEXT_ENCODER),
        ("text_encoder_2", TEXT_ENCODER),
        ("vae", VAE),
    ),
    # CFG batch of 2 through the UNet's 640/1280-channel attention at 64/32 px latents.
    workload=Workload(GIB, 2 * GIB, GIB // 8),
    text_encoder_keys=(("clip_l_path", "text_encoder"), ("clip_g_path", "text_encoder_2")),
    single_file_prefixes=(
        ("conditioner.embedders.0.", "text_encoder"),
        ("conditioner.embedders.1.", "text_encoder_2"),
        ("first_stage_model.", "vae"),
        ("", "unet"),
    ),
    default_repo="stabilityai/stable-diffusion-xl-base-1.0",
)

SD3 = ArchSpec(
    name="sd3",
    label="Stable Diffusion 3.5",
    size_multiple=16,
    default_size=1024,
    default_steps=28,
    default_guidance=4.5,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="cfg",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    single_file_markers=("joint_blocks.0.context_block.",),
    components=(
        ("transformer", BACKBONE),
        ("text_encoder", TEXT_ENCODER),
        ("text_encoder_2", TEXT_ENCODER),
        ("text_encoder_3", TEXT_ENCODER),
        ("vae", VAE),
    ),
    # SD 3.5 large: 4429 tokens x (2432 x 8 + 9728 x 2) x 2 bytes, twice for CFG.
    workload=Workload(int(0.70 * GIB), 2 * GIB, GIB // 4),
    text_encoder_keys=(
        ("clip_l_path", "text_encoder"),
        ("clip_g_path", "text_encoder_2"),
        ("t5_path", "text_encoder_3"),
    ),
    single_file_prefixes=(
        ("text_encoders.clip_l.", "text_encoder"),
        ("text_encoders.clip_g.", "text_encoder_2"),
        ("text_encoders.t5xxl.", "text_encoder_3"),
        ("first_stage_model.", "vae"),
        ("", "transformer"),
    ),
    default_repo="stabilityai/stable-diffusion-3.5-large",
)

FLUX_COMPONENTS = (
    ("transformer", BACKBONE),
    ("text_encoder", TEXT_ENCODER),
    ("text_encoder_2", TEXT_ENCODER),
    ("vae", VAE),
)
FLUX_SINGLE_FILE_PREFIXES = (
    ("text_encoders.clip_l.", "text_encoder"),
    ("text_encoders.t5xxl.", "text_encoder_2"),
    ("first_stage_model.", "vae"),
    ("vae.", "vae"),
    ("", "transformer"),  # BFL's `flux1-dev.safetensors` holds the transformer alone, unprefixed
)

FLUX = ArchSpec(
    name="flux",
    label="Flux.1",
    size_multiple=16,
    default_size=1024,
    default_steps=20,
    default_guidance=4.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="embedded",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    single_file_markers=("double_blocks.0.img_attn.",),
    components=FLUX_COMPONENTS,
    # 4096 image + 512 text tokens x (3072 x 8 + 12288 x 2 + 15360) x 2 bytes in a single block,
    # plus RoPE's fp32 copies of q and k. VAE: the last up block at 1024 px holds 3-4 tensors of
    # 256 channels x 1 MP.
    workload=Workload(int(0.75 * GIB), 2 * GIB, GIB // 4),
    text_encoder_keys=(("clip_l_path", "text_encoder"), ("t5_path", "text_encoder_2")),
    single_file_prefixes=FLUX_SINGLE_FILE_PREFIXES,
    default_repo="black-forest-labs/FLUX.1-dev",
    true_cfg=True,
)

# FLUX.1 Kontext [dev]: Flux.1's weights layout exactly (a single file cannot tell it from
# Flux.1: set `arch: flux_kontext`), with the reference image's tokens beside the image's.
FLUX_KONTEXT = ArchSpec(
    name="flux_kontext",
    label="Flux.1 Kontext",
    size_multiple=16,
    default_size=1024,
    default_steps=20,  # ai-toolkit's train_lora_flux_kontext_24gb.yaml
    default_guidance=4.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="embedded",
    pipeline_classes=("FluxKontextPipeline",),
    single_file_markers=(),
    components=FLUX_COMPONENTS,
    workload=Workload(int(1.5 * GIB), 2 * GIB, GIB // 4),  # Flux's, with the reference tokens doubling it
    text_encoder_keys=(("clip_l_path", "text_encoder"), ("t5_path", "text_encoder_2")),
    single_file_prefixes=FLUX_SINGLE_FILE_PREFIXES,
    default_repo="black-forest-labs/FLUX.1-Kontext-dev",
    control_images=1,
    lora_groups=("flux",),
    true_cfg=True,
)

# Chroma: Flux.1 schnell's blocks without per-block modulation (a `distilled_guidance_layer`
# gives it), T5 only, real CFG with a negative prompt.
CHROMA = ArchSpec(
    name="chroma",
    label="Chroma",
    size_multiple=16,
    default_size=1024,
    default_steps=25,  # ai-toolkit's train_lora_chroma_24gb.yaml
    default_guidance=4.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="cfg",
    pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"),
    single_file_markers=("distilled_guidance_layer.",),
    components=(("transformer", BACKBONE), ("text_encoder", TEXT_ENCODER), ("vae", VAE)),
    workload=Workload(int(1.5 * GIB), 2 * GIB, GIB // 4),  # Flux's block widths, CFG's batch of 2
    text_encoder_keys=(("t5_path", "text_encoder"),),
    single_file_prefixes=(("text_encoders.t5xxl.", "text_encoder"), *FLUX_SINGLE_FILE_PREFIXES[2:]),
    default_repo="lodestones/Chroma1-HD",
    lora_groups=("flux",),
)

FLUX2_SINGLE_FILE_MARKERS = ("double_stream_modulation_img.",)

# FLUX.2 [dev]: a 32B transformer (width 6144), Mistral Small 3.1 as text encoder, embedded guidance.
FLUX2 = ArchSpec(
    name="flux2",
    label="Flux.2",
    size_multiple=16,
    default_size=1024,
    default_steps=28,
    default_guidance=4.0,  # Flux2Pipeline's default
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="embedded",
    pipeline_classes=("Flux2Pipeline",),
    single_file_markers=FLUX2_SINGLE_FILE_MARKERS,
    components=(("transformer", BACKBONE), ("text_encoder", TEXT_ENCODER), ("vae", VAE)),
    # 4096 + 512 tokens x (6144 x 8 + 18432 x 3) x 2 bytes; Mistral's hidden states of three layers.
    workload=Workload(int(1.5 * GIB), 2 * GIB, GIB // 2),
    default_repo="black-forest-labs/FLUX.2-dev",
    control_images=3,
    lora_groups=("flux2", "flux"),
)

# FLUX.2 [klein] 4B / 9B: the Flux.2 transformer at 3072 / 4096 wide, Qwen3 as text encoder, and
# real CFG (the base models ai-toolkit trains; the step-distilled ones ignore guidance).
FLUX2_KLEIN = ArchSpec(
    name="flux2_klein",
    label="Flux.2 Klein",
    size_multiple=16,
    default_size=1024,
    default_steps=28,
    default_guidance=4.0,  # Flux2KleinPipeline's default
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="cfg",
    pipeline_classes=("Flux2KleinPipeline",),
    single_file_markers=(),  # its BFL names are Flux.2's: set `arch: flux2_klein`
    components=(("transformer", BACKBONE), ("text_encoder", TEXT_ENCODER), ("vae", VAE)),
    workload=Workload(int(1.5 * GIB), 2 * GIB, GIB // 4),
    default_repo="black-forest-labs/FLUX.2-klein-base-4B",
    control_images=3,
    lora_groups=("flux2", "flux"),
)

QWEN_COMPONENTS = (("transformer", BACKBONE), ("text_encoder", TEXT_ENCODER), ("vae", VAE))
# 60 blocks of width 3072, 4096 image tokens, true CFG's second pass; the Wan-style VAE's
# decoder at 1 MP; Qwen2.5-VL 7B's last hidden state.
QWEN_WORKLOAD = Workload(int(1.5 * GIB), 3 * GIB, GIB // 2)

QWEN_IMAGE = ArchSpec(
    name="qwen_image",
    label="Qwen-Image",
    size_multiple=16,
    default_size=1024,
    default_steps=25,  # ai-toolkit's train_lora_qwen_image_24gb.yaml
    default_guidance=3.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="true_cfg",
    pipeline_classes=("QwenImagePipeline", "QwenImageImg2ImgPipeline"),
    single_file_markers=("img_mod.1.",),  # Qwen's modulation Sequential; Flux names it `img_mod.lin`
    components=QWEN_COMPONENTS,
    workload=QWEN_WORKLOAD,
    default_repo="Qwen/Qwen-Image",
)

QWEN_IMAGE_EDIT = ArchSpec(
    name="qwen_image_edit",
    label="Qwen-Image-Edit",
    size_multiple=16,
    default_size=1024,
    default_steps=25,  # ai-toolkit's train_lora_qwen_image_edit_32gb.yaml
    default_guidance=3.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="true_cfg",
    pipeline_classes=("QwenImageEditPipeline",),
    single_file_markers=(),  # Qwen-Image's weights layout: set `arch: qwen_image_edit`
    components=QWEN_COMPONENTS,
    workload=Workload(3 * GIB, 3 * GIB, GIB),  # the reference's tokens double the sequence
    default_repo="Qwen/Qwen-Image-Edit",
    control_images=1,
    lora_groups=("qwen_image",),
)

QWEN_IMAGE_EDIT_PLUS = ArchSpec(
    name="qwen_image_edit_plus",
    label="Qwen-Image-Edit Plus (2509, 2511)",
    size_multiple=16,
    default_size=1024,
    default_steps=25,  # ai-toolkit's train_lora_qwen_image_edit_2509_32gb.yaml
    default_guidance=3.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="true_cfg",
    pipeline_classes=("QwenImageEditPlusPipeline",),
    single_file_markers=(),
    components=QWEN_COMPONENTS,
    workload=Workload(6 * GIB, 3 * GIB, GIB),  # up to three references
    default_repo="Qwen/Qwen-Image-Edit-2509",
    control_images=3,
    lora_groups=("qwen_image",),
)

# Z-Image (Turbo, base, De-Turbo): a 6B single-stream transformer, Qwen3 4B, Flux.1's VAE, CFG.
ZIMAGE = ArchSpec(
    name="zimage",
    label="Z-Image",
    size_multiple=16,
    default_size=1024,
    default_steps=25,  # ai-toolkit's UI default for `zimage` (Turbo users set 8-9 steps, guidance 1)
    default_guidance=4.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="cfg",
    pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline"),
    single_file_markers=("noise_refiner.0.",),
    components=(("transformer", BACKBONE), ("text_encoder", TEXT_ENCODER), ("vae", VAE)),
    # 4096 + 512 tokens x (3840 x 8 + 10240 x 3) x 2 bytes, CFG's batch of 2.
    workload=Workload(int(1.25 * GIB), 2 * GIB, GIB // 4),
    default_repo="Tongyi-MAI/Z-Image-Turbo",
)

# Stable Diffusion 1.5: a UNet with CLIP-L, noise prediction, CFG.
SD15 = ArchSpec(
    name="sd15",
    label="Stable Diffusion 1.5",
    size_multiple=8,
    default_size=512,
    default_steps=20,
    default_guidance=7.5,  # StableDiffusionPipeline's and kohya's default
    default_sampler="euler_a",
    is_flow_model=False,
    guidance="cfg",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    single_file_markers=("cond_stage_model.transformer.text_model.",),
    components=(("unet", BACKBONE), ("text_encoder", TEXT_ENCODER), ("vae", VAE)),
    # Self-attention at the 64x64 latent of 512 px (4096 tokens) grows with the square of 1 MP's 16384.
    workload=Workload(2 * GIB, 2 * GIB, GIB // 8),
    text_encoder_keys=(("clip_l_path", "text_encoder"),),
    single_file_prefixes=(
        ("cond_stage_model.", "text_encoder"),
        ("first_stage_model.", "vae"),
        ("model.diffusion_model.", "unet"),
    ),
    default_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
)

# Wan 2.1 and 2.2 (text- and image-to-video): a 3D DiT on UMT5-XXL, the Wan VAE (8x spatial, 4x
# temporal: 1 + 4k frames), CFG. 2.2 A14B splits denoising between two experts, `transformer`
# (high noise) and `transformer_2` (low noise), at the pipeline's `boundary_ratio`. Defaults: ai-toolkit's
# `train_lora_wan21_*_24gb.yaml` (832x480, 30 steps, guidance 5); 16 fps is Wan's `sample_fps`.
WAN = ArchSpec(
    name="wan",
    label="Wan",
    size_multiple=16,
    default_size=832,
    default_height=480,
    default_steps=30,
    default_guidance=5.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    guidance="cfg",
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline"),
    single_file_markers=("text_embedding.0.", "condition_embedder.text_embedder."),
    components=(
        ("transformer", BACKBONE),
        ("transformer_2", BACKBONE),
        ("text_encoder", TEXT_ENCODER),
        ("image_encoder", TEXT_ENCODER),
        ("vae", VAE),
    ),
    # Per megapixel of frame at 81 frames (21 latent frames, 21 x 1560 tokens at 832x480): the
    # 14B blocks' 5120-wide activations with CFG's second pass; the causal 3D VAE decodes frames
    # in chunks, its cache about four frames' worth.
    workload=Workload(6 * GIB, 6 * GIB, GIB // 2),
    default_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    control_images=1,  # image-to-video's start frame (`ctrl_img`, musubi `--i`)
    frame_step=4,
    default_fps=16,
)

# Detection order: an architecture whose tensor names contain another's comes first.
ARCH_SPECS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        SDXL,
        SD3,
        CHROMA,
        FLUX2,
        FLUX,
        SD15,
        QWEN_IMAGE,
        ZIMAGE,
        FLUX_KONTEXT,
        FLUX2_KLEIN,
        QWEN_IMAGE_EDIT,
        QWEN_IMAGE_EDIT_PLUS,
        WAN,
    )
}

# Names users and trainers write for each architecture: ai-toolkit's `arch` (its model classes'
# `arch` attributes, its UI's names), EriDiffusion's, kohya's and SimpleTuner's.
ARCH_ALIASES: dict[str, Arch] = {
    "sdxl": "sdxl",
    "sd_xl": "sdxl",
    "xl": "sdxl",
    "sd3": "sd3",
    "sd35": "sd3",
    "sd3.5": "sd3",
    "sd3_5": "sd3",
    "sd35_large": "sd3",
    "sd35_medium": "sd3",
    "sd3.5_large": "sd3",
    "sd3.5_medium": "sd3",
    "v3": "sd3",
    "flux": "flux",
    "flux1": "flux",
    "flux.1": "flux",
    "flux_dev": "flux",
    "flux_schnell": "flux",
    "flux-dev": "flux",
    "flux-schnell": "flux",
    "flex1": "flux",  # ai-toolkit maps Flex.1 to flux
    "flux_kontext": "flux_kontext",
    "kontext": "flux_kontext",
    "flux-kontext": "flux_kontext",
    "chroma": "chroma",
    "flux2": "flux2",
    "flux.2": "flux2",
    "flux2_dev": "flux2",
    "flux2_klein": "flux2_klein",
    "flux2_klein_4b": "flux2_klein",
    "flux2_klein_9b": "flux2_klein",
    "qwen_image": "qwen_image",
    "qwen-image": "qwen_image",
    "qwen_image_edit": "qwen_image_edit",
    "qwen-image-edit": "qwen_image_edit",
    "qwen_image_edit_plus": "qwen_image_edit_plus",
    "qwen_image_edit_2509": "qwen_image_edit_plus",
    "zimage": "zimage",
    "z_image": "zimage",
    "z-image": "zimage",
    "sd15": "sd15",
    "sd1": "sd15",
    "sd1.5": "sd15",
    "sd_1_5": "sd15",
    "sd-1.5": "sd15",
    "v1": "sd15",
    # ai-toolkit: `wan21` / `wan21_i2v` / `wan22_14b` / `wan22_14b_i2v` / `wan22_5b` (its model classes'
    # `arch`; the UI adds `:1b`, `:14b`, `:t2v`...), and the size-named forms older configs use.
    **{
        name: "wan"
        for name in (
            "wan",
            "wan21",
            "wan2.1",
            "wan_2.1",
            "wan21_1b",
            "wan21_14b",
            "wan21_i2v",
            "wan21_i2v_14b",
            "wan22",
            "wan2.2",
            "wan_2.2",
            "wan22_14b",
            "wan22_14b_i2v",
            "wan22_5b",
            "wan-2.1",
            "wan-2.2",
        )
    },
}


def canonical_arch(name: str) -> Arch | None:
    """The architecture a name or alias means, or None. ai-toolkit's UI writes a variant
    after a colon (`zimage:turbo`, `qwen_image_edit_plus:2511`) and drops it, as sidecar does."""
    key = name.strip().lower().split(":", 1)[0].strip()
    return ARCH_ALIASES.get(key)


def arch_spec(name: str) -> ArchSpec:
    """The spec for an architecture name or alias; raises naming the known names."""
    key = canonical_arch(name)
    if key is None:
        known = ", ".join(sorted(ARCH_ALIASES))
        raise ValueError(f"unknown architecture {name!r}; known names: {known}")
    return ARCH_SPECS[key]


def arch_from_pipeline_class(class_name: str) -> Arch | None:
    """The architecture of a diffusers `model_index.json` `_class_name`, or None."""
    for spec in ARCH_SPECS.values():
        if class_name in spec.pipeline_classes:
            return spec.name
    return None


def arch_from_tensor_names(names: list[str] | tuple[str, ...] | set[str]) -> Arch | None:
    """The architecture of a single-file checkpoint from its tensor names, or None.

    Specs are tried in `ARCH_SPECS` order, the more specific first (a Chroma file also has
    Flux's `double_blocks`).
    """
    for spec in ARCH_SPECS.values():
        if any(marker in name for name in names for marker in spec.single_file_markers):
            return spec.name
    return None


# Substrings of LoRA keys that only one group of architectures' modules have, in the layouts
# their trainers write (diffusers / PEFT, kohya / musubi `lora_unet_…`, ai-toolkit / ComfyUI
# `diffusion_model.…`). A group is named after the architecture whose label the messages use.
LORA_KEY_MARKERS: dict[str, tuple[str, ...]] = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks"),  # Flux.1, Kontext, Chroma
    "flux2": ("to_qkv_mlp_proj", "linear_in", "stream_modulation"),  # Flux.2's fused single block, its MLP
    "sd3": ("joint_blocks",),
    "sdxl": (
        "unet.",
        "lora_unet_down_blocks",
        "lora_unet_up_blocks",
        "lora_unet_mid_block",
        "lora_unet_input_blocks",
        "lora_unet_output_blocks",
        "lora_unet_middle_block",
        "lora_te2_",
    ),
    # SD 1.5's first down block and last up block have attention, SDXL's do not; one text encoder.
    "sd15": (
        "down_blocks.0.attentions",
        "down_blocks_0_attentions",
        "up_blocks.3.attentions",
        "up_blocks_3_attentions",
        "input_blocks_1_1_",
        "lora_te_text_model",
    ),
    "qwen_image": ("img_mlp.net", "img_mlp_net", "txt_mlp.net", "txt_mlp_net", "img_mod.1", "img_mod_1"),
    "zimage": ("noise_refiner", "context_refiner", "feed_forward", ".attention.to_", "_attention_to_"),
}
# A group whose markers are found wins over the one named beside it, whose names it shares.
LORA_MARKER_PRECEDENCE = (("flux2", "flux"), ("sd15", "sdxl"))
# Keys of a transformer denoiser: never a UNet's (a `lora_te2_` CLIP-G beside them is SD 3.5's).
TRANSFORMER_KEY_PREFIXES = ("lora_transformer_", "transformer.", "lycoris_transformer_blocks_")


def guess_lora_arch(keys: list[str] | tuple[str, ...]) -> str | None:
    """The one group of architectures (`LORA_KEY_MARKERS`) whose module names a LoRA's keys use,
    or None when they fit several or none. `ArchSpec.takes_lora_of` says which bases take it."""
    found = {
        group for group, markers in LORA_KEY_MARKERS.items() if any(m in key for key in keys for m in markers)
    }
    for winner, loser in LORA_MARKER_PRECEDENCE:
        if winner in found:
            found.discard(loser)
    if any(key.startswith(TRANSFORMER_KEY_PREFIXES) for key in keys):
        found -= {"sdxl", "sd15"}
    return found.pop() if len(found) == 1 else None


def known_arch_labels() -> str:
    """`Stable Diffusion XL (sdxl), ...`: for messages that list what sidecar renders."""
    return ", ".join(f"{spec.label} ({spec.name})" for spec in ARCH_SPECS.values())
