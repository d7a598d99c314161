"""The architectures sidecar renders: one `ArchSpec` each, with every fact about it.

Adding an architecture is one `ArchSpec` here (and its place in `ARCH_SPECS`), one renderer
file in `sidecar/render/`, one registry line and a tiny builder in `sidecar/testing/`.

Defaults (steps, guidance) are those of the trainer example configs users start from
(ai-toolkit's `config/examples/` and its UI's per-model defaults), else the model's own
diffusers pipeline defaults. Aliases are the names trainers write: ai-toolkit's `arch` (its
model classes' `arch` attributes, its UI's names), EriDiffusion's, kohya's and SimpleTuner's.
"""

from __future__ import annotations

from sidecar.arch.spec import BACKBONE, GIB, TEXT_ENCODER, VAE, Arch, ArchSpec, Workload

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
    aliases=("sd_xl", "xl"),
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
    aliases=("sd35", "sd3.5", "sd3_5", "sd35_large", "sd35_medium", "sd3.5_large", "sd3.5_medium", "v3"),
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
    # ai-toolkit maps Flex.1 to flux
    aliases=("flux1", "flux.1", "flux_dev", "flux_schnell", "flux-dev", "flux-schnell", "flex1"),
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
    aliases=("kontext", "flux-kontext"),
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
    aliases=("flux.2", "flux2_dev"),
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
    aliases=("flux2_klein_4b", "flux2_klein_9b"),
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
    aliases=("qwen-image",),
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
    aliases=("qwen-image-edit",),
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
    aliases=("qwen_image_edit_2509",),
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
    aliases=("z_image", "z-image"),
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
    aliases=("sd1", "sd1.5", "sd_1_5", "sd-1.5", "v1"),
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
    # ai-toolkit: `wan21` / `wan21_i2v` / `wan22_14b` / `wan22_14b_i2v` / `wan22_5b` (its model classes'
    # `arch`; the UI adds `:1b`, `:14b`, `:t2v`...), and the size-named forms older configs use.
    aliases=(
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
    ),
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

# Every name and alias -> the architecture it means.
ARCH_ALIASES: dict[str, Arch] = {
    alias: spec.name for spec in ARCH_SPECS.values() for alias in (spec.name, *spec.aliases)
}
