"""Wan 2.1 / 2.2, text- and image-to-video: frames equal a plain diffusers call, LoRAs on either
or both experts as each trainer writes them, and `sidecar render` / `sidecar watch` end to end.

Tiny models (`sidecar.testing.tiny_wan`): 32x32 px, 5 frames, 2 steps. With two steps and the
2.2 boundary at t = 875, the first step runs `transformer` and the second `transformer_2`, so
a LoRA in the wrong expert changes the frames.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sidecar.errors import SidecarError
from sidecar.plan.request import ModelSource, SampleRequest
from sidecar.render.registry import load_renderer
from sidecar.render.schedulers import make_scheduler
from sidecar.render.wan import WanImageToVideoRenderer, WanRenderer
from sidecar.render.wan_experts import ExpertSlot
from sidecar.testing.loras_wan import write_wan22_loras, write_wan_lora
from sidecar.testing.tiny_wan import save_tiny_wan, tiny_wan_name

FIXTURES = Path(__file__).parents[1] / "fixtures" / "configs"
SIZE, FRAMES, STEPS, GUIDANCE = 32, 5, 2, 5.0
PROMPT = "a red fox running in the snow"


@pytest.fixture(scope="module")
def wan_models(tmp_path_factory, quiet_diffusers, single_threaded_torch) -> dict[str, Path]:
    """`{"2.1-t2v": folder, ...}`: the four tiny Wan models, built once for this module."""
    root = tmp_path_factory.mktemp("tiny-wan")
    return {
        f"{version}-{'i2v' if i2v else 't2v'}": save_tiny_wan(
            root / tiny_wan_name(version, image_to_video=i2v), version, image_to_video=i2v
        )
        for version in ("2.1", "2.2")
        for i2v in (False, True)
    }


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("start") / "start.png"
    gradient = np.linspace(0, 255, 40 * 48 * 3).reshape(40, 48, 3).astype(np.uint8)
    Image.fromarray(gradient).save(path)
    return path


def request(**changes) -> SampleRequest:
    fields = {
        "index": 0,
        "prompt": PROMPT,
        "negative_prompt": "",
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "true_cfg_scale": 1.0,
        "sampler": "flowmatch",
        "seed": 7,
        "strength": 1.0,
        "num_frames": FRAMES,
        "fps": 16,
    }
    fields.update(changes)
    return SampleRequest(**fields)


def renderer_for(folder: Path) -> WanRenderer:
    return load_renderer(ModelSource(arch="wan", name_or_path=str(folder)), device="cpu", dtype="fp32")  # type: ignore[return-value]


def rendered(renderer: WanRenderer, sample: SampleRequest) -> list[np.ndarray]:
    [(_, output)] = list(renderer.render([sample]))
    frames = output if isinstance(output, list) else [output]
    return [np.asarray(frame) for frame in frames]


def reference(folder: Path, loads=(), *, image: Path | None = None, sample: SampleRequest | None = None):
    """A plain diffusers call: `from_pretrained`, `load_lora_weights` per (file, kwargs), the seed in a
    CPU generator, the sampler's scheduler built from the model's config."""
    sample = sample or request()
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for path, options in loads:
        pipe.load_lora_weights(str(path), **options)
    config = dict(pipe.scheduler.config)
    pipe.scheduler = make_scheduler("wan", sample.sampler, {**config, "shift": config["flow_shift"]})
    arguments = {
        "prompt": sample.prompt,
        "negative_prompt": sample.negative_prompt,
        "height": sample.height,
        "width": sample.width,
        "num_frames": sample.num_frames,
        "num_inference_steps": sample.steps,
        "guidance_scale": sample.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(sample.seed),
        "output_type": "pil",
    }
    if loads:
        arguments["attention_kwargs"] = {"scale": sample.strength}
    if image is not None:
        arguments["image"] = Image.open(image).convert("RGB")
    return [np.asarray(frame) for frame in pipe(**arguments).frames[0]]


def assert_equal_frames(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want) == FRAMES
    for number, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(a, b), f"frame {number} differs by up to {np.abs(a.astype(int) - b).max()}"


# ---------------------------------------------------------------------------------
# Pixel-equal against plain diffusers
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_format", ["aitoolkit", "musubi", "peft"])
def test_wan21_frames_equal_a_plain_diffusers_call(wan_models, tmp_path, lora_format):
    folder = wan_models["2.1-t2v"]
    lora = write_wan_lora(folder, tmp_path / f"{lora_format}.safetensors", lora_format=lora_format)
    renderer = renderer_for(folder)
    assert type(renderer) is WanRenderer
    report = renderer.apply_lora(lora)
    assert report.injected == {"transformer": 20}  # 2 blocks x (8 attention + 2 feed-forward) layers
    got = rendered(renderer, request())
    assert_equal_frames(got, reference(folder, [(lora, {})]))
    assert not np.array_equal(got[-1], reference(folder)[-1])  # the LoRA changed them


def test_wan22_split_loras_go_to_their_experts(wan_models, tmp_path):
    """ai-toolkit's `_high_noise` / `_low_noise` pair, either named: frames equal diffusers with the
    high-noise file in `transformer` and the low-noise one in `transformer_2`."""
    folder = wan_models["2.2-t2v"]
    high, low = write_wan22_loras(folder, tmp_path, "my_lora_000000500")
    renderer = renderer_for(folder)
    assert isinstance(renderer.adapter, ExpertSlot)
    report = renderer.apply_lora(low)  # the sibling is found from either name
    assert report.injected == {"transformer": 20, "transformer_2": 20}
    got = rendered(renderer, request())
    assert_equal_frames(got, reference(folder, [(high, {}), (low, {"load_into_transformer_2": True})]))
    swapped = reference(folder, [(low, {}), (high, {"load_into_transformer_2": True})])
    assert not np.array_equal(got[-1], swapped[-1])  # the experts' LoRAs are not interchangeable


def test_wan22_combined_file_splits_between_the_experts(wan_models, tmp_path):
    """ai-toolkit's `split_multistage_loras: false`: `transformer_1.` / `transformer_2.` keys in one file."""
    folder = wan_models["2.2-t2v"]
    [combined] = write_wan22_loras(folder, tmp_path / "combined", "my_lora_000000500", layout="combined")
    high, low = write_wan22_loras(folder, tmp_path / "split", "my_lora_000000500")
    renderer = renderer_for(folder)
    renderer.apply_lora(combined)
    assert_equal_frames(
        rendered(renderer, request()),
        reference(folder, [(high, {}), (low, {"load_into_transformer_2": True})]),
    )


def test_wan22_one_file_applies_to_both_experts(wan_models, tmp_path):
    """musubi-tuner's one LoRA trained across both experts (`--dit` and `--dit_high_noise`)."""
    folder = wan_models["2.2-t2v"]
    [lora] = write_wan22_loras(folder, tmp_path, "my_lora-step00000500", layout="one", lora_format="musubi")
    renderer = renderer_for(folder)
    renderer.apply_lora(lora)
    assert_equal_frames(
        rendered(renderer, request()),
        reference(folder, [(lora, {}), (lora, {"load_into_transformer_2": True})]),
    )


def test_wan22_a_high_noise_file_alone_leaves_the_low_noise_expert_base(wan_models, tmp_path, caplog):
    folder = wan_models["2.2-t2v"]
    [high] = write_wan22_loras(folder, tmp_path, "my_lora_000000500", experts=("high",))
    renderer = renderer_for(folder)
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        report = renderer.apply_lora(high)
    assert report.injected == {"transformer": 20}
    assert "no LoRA for transformer_2 (low noise)" in caplog.text
    assert_equal_frames(rendered(renderer, request()), reference(folder, [(high, {})]))


def test_wan22_next_checkpoint_is_copied_in_place_and_renders_as_if_loaded_fresh(wan_models, tmp_path):
    folder = wan_models["2.2-t2v"]
    write_wan22_loras(folder, tmp_path, "my_lora_000000250", seed=1)
    high, low = write_wan22_loras(folder, tmp_path, "my_lora_000000500", seed=5)
    renderer = renderer_for(folder)
    assert not renderer.apply_lora(tmp_path / "my_lora_000000250_high_noise.safetensors").hotswapped
    assert renderer.apply_lora(high).hotswapped
    assert_equal_frames(
        rendered(renderer, request()),
        reference(folder, [(high, {}), (low, {"load_into_transformer_2": True})]),
    )
    renderer.remove_lora()
    assert_equal_frames(rendered(renderer, request()), reference(folder))


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_image_to_video_starts_from_the_samples_start_image(wan_models, tmp_path, start_image, version):
    folder = wan_models[f"{version}-i2v"]
    renderer = renderer_for(folder)
    assert type(renderer) is WanImageToVideoRenderer
    if version == "2.1":
        lora = write_wan_lora(folder, tmp_path / "i2v.safetensors")
        loads = [(lora, {})]
    else:
        high, low = write_wan22_loras(folder, tmp_path, "i2v_000000500")
        lora, loads = high, [(high, {}), (low, {"load_into_transformer_2": True})]
    renderer.apply_lora(lora)
    sample = request(control_images=(str(start_image),))  # ai-toolkit's `ctrl_img`
    got = rendered(renderer, sample)
    assert_equal_frames(got, reference(folder, loads, image=start_image))
    musubi = rendered(renderer, request(init_image=str(start_image)))  # musubi's `--i`
    assert_equal_frames(musubi, got)
    with pytest.raises(SidecarError, match="needs a start image; set `ctrl_img`"):
        rendered(renderer, request())


def test_one_frame_is_a_still_image(wan_models):
    renderer = renderer_for(wan_models["2.1-t2v"])
    [(_, output)] = list(renderer.render([request(num_frames=1)]))
    assert isinstance(output, Image.Image) and output.size == (SIZE, SIZE)
    plain = reference(wan_models["2.1-t2v"], sample=request(num_frames=1))
    assert len(plain) == 1 and np.array_equal(np.asarray(output), plain[0])


@pytest.mark.parametrize("sampler", ["unipc", "dpmpp_2m", "euler_a"])
def test_wan_samplers_render(wan_models, sampler):
    """The model's own flow UniPC, flow DPM++ 2M and stochastic flow Euler: finite, distinct frames."""
    renderer = renderer_for(wan_models["2.1-t2v"])
    frames = rendered(renderer, request(sampler=sampler))
    euler = rendered(renderer, request())
    assert len(frames) == FRAMES and not np.array_equal(frames[-1], euler[-1])


# ---------------------------------------------------------------------------------
# The plan, and `sidecar render` / `sidecar watch` end to end
# ---------------------------------------------------------------------------------


def fixture_config(name: str, folder: Path, model: Path, start: Path | None = None) -> Path:
    text = (FIXTURES / f"{name}.yaml").read_text(encoding="utf-8")
    text = text.replace("MODEL_PATH", str(model)).replace("TRAINING_FOLDER", str(folder / "output"))
    path = folder / "train.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("references/person.png", str(start)), encoding="utf-8")
    return path


def test_the_plan_snaps_frame_counts_and_writes_video_as_animated_webp(tmp_path, wan_models, caplog):
    from sidecar.arch import arch_spec
    from sidecar.plan.build import build_plan
    from sidecar.plan.config import load_trainer_config

    assert {
        arch_spec(name).name for name in ("wan21", "wan21_1b", "wan22_14b", "wan22_14b_i2v", "wan22_5b")
    } == {"wan"}
    config = load_trainer_config(fixture_config("wan21_t2v", tmp_path, wan_models["2.1-t2v"]))
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        plan = build_plan(config)
    assert [r.num_frames for r in plan.requests] == [5, 5, 1]  # 6 -> 5, as diffusers' Wan rounds
    assert "`num_frames` 6 is not 1 + a multiple of 4 for Wan; using 5" in caplog.text
    assert [r.fps for r in plan.requests] == [8, 8, 8]
    assert plan.image_format == "webp"  # ai-toolkit switches video samples to WebP too


@pytest.mark.slow
def test_sidecar_render_and_watch_write_video_samples_for_wan21_and_wan22(tmp_path, wan_models, start_image):
    from sidecar.app.render_cmd import render_command
    from sidecar.app.watch import WatchRequest, run_watch
    from sidecar.publish.video import frame_count

    # Wan 2.1 text-to-video, `sidecar render` of ai-toolkit's checkpoint.
    config = fixture_config("wan21_t2v", tmp_path / "t2v", wan_models["2.1-t2v"])
    run = tmp_path / "t2v" / "output" / "my_wan_lora"
    checkpoint = write_wan_lora(wan_models["2.1-t2v"], run / "my_wan_lora_000000500.safetensors")
    assert render_command(checkpoint=checkpoint, config_path=config, overrides={"device": "cpu"}) == 0
    step = run / "samples" / "step_000500"
    assert sorted(p.name for p in step.iterdir()) == [
        "grid.png",
        *(f"sample_0{i}.{suffix}" for i in (0, 1) for suffix in ("mp4", "txt", "webp")),
        "sample_02.txt",
        "sample_02.webp",  # `num_frames: 1`: a still image, no MP4
    ]
    assert frame_count(step / "sample_00.webp") == 5 and frame_count(step / "sample_02.webp") == 1
    assert "Frames: 5, FPS: 8" in (step / "sample_00.txt").read_text()
    assert 'href="step_000500/sample_00.mp4"' in (run / "samples" / "index.html").read_text()
    # Again: the samples on disk are kept (their WebP is the plan's image).
    before = (step / "sample_00.mp4").stat().st_mtime_ns
    assert render_command(checkpoint=checkpoint, config_path=config, overrides={"device": "cpu"}) == 0
    assert (step / "sample_00.mp4").stat().st_mtime_ns == before

    # Wan 2.2 image-to-video under the daemon: ai-toolkit's combined two-expert file, TensorBoard on.
    pytest.importorskip("tensorboard")
    config = fixture_config("wan22_i2v", tmp_path / "i2v", wan_models["2.2-i2v"], start_image)
    run = tmp_path / "i2v" / "output" / "my_wan22_lora"
    write_wan22_loras(wan_models["2.2-i2v"], run, "my_wan22_lora_000000250", layout="combined")
    request = WatchRequest(
        output_dir=run,
        config_path=config,
        overrides={"device": "cpu", "settle_seconds": 0.0, "tensorboard": tmp_path / "tb"},
        once=True,
    )
    assert run_watch(request) == 0
    step = run / "samples" / "step_000250"
    assert sorted(p.name for p in step.iterdir()) == [
        "grid.png",
        "sample_00.mp4",
        "sample_00.txt",
        "sample_00.webp",
    ]
    assert frame_count(step / "sample_00.webp") == 5
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
