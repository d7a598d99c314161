"""sidecar/plan/prompts.py: inline flags, kohya prompt files, wildcards and the trigger word."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.errors import ConfigError
from sidecar.plan.build import build_plan
from sidecar.plan.config import TrainerConfig, load_trainer_config
from sidecar.plan.prompts import Origin, Wildcards, apply_trigger, parse_prompt_flags, prompt_lines
from sidecar.plan.request import SamplePlan


def plan_of(fixture: str, **kwargs: object) -> tuple[TrainerConfig, SamplePlan]:
    config = load_trainer_config(FIXTURES / fixture)
    return config, build_plan(config, **kwargs)  # type: ignore[arg-type]


def write_config(
    tmp_path: Path, sample: str, *, arch: str = "sdxl", trigger: str | None = "tr1g", extra: str = ""
) -> TrainerConfig:
    """A flat config with the given `sample:` body (indented by two spaces)."""
    trigger_line = f"trigger_word: {trigger}\n" if trigger else ""
    (tmp_path / "train.yaml").write_text(
        f"name: t\n{trigger_line}model: {{name_or_path: m, arch: {arch}}}\n{extra}sample:\n{sample}"
    )
    return load_trainer_config(tmp_path / "train.yaml")


# ------------------------------------------------------------------ kohya prompt file


def test_bad_flag_value_in_prompt_file(tmp_path: Path) -> None:
    config = load_trainer_config(FIXTURES / "eri_flux.yaml")
    prompts = tmp_path / "p.txt"
    prompts.write_text("# header\n\na cat --w abc\n")
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=prompts)
    assert str(caught.value) == f"{prompts}:3: `--w` must be a positive integer, got 'abc'"


def test_prompt_file_problems(tmp_path: Path) -> None:
    config = load_trainer_config(FIXTURES / "eri_flux.yaml")
    with pytest.raises(ConfigError, match="no such prompt file"):
        build_plan(config, prompts_file=tmp_path / "missing.txt")
    (tmp_path / "p.toml").write_text("[prompt]\nwidth = 512\n")
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "p.toml")
    assert str(caught.value) == (
        f"{tmp_path / 'p.toml'}:1 prompt.subset: must hold `[[prompt.subset]]` entries, one per prompt "
        "(kohya's .toml prompt file)"
    )
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        build_plan(config, prompts_file=tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("# only comments\n\n")
    with pytest.raises(ConfigError, match="has no prompts"):
        build_plan(config, prompts_file=tmp_path / "empty.txt")


# ------------------------------------------------------------------ flags in YAML prompts


def test_bad_flag_value_in_yaml_prompt_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, '  prompts:\n    - "fine"\n    - "a dog --s many"\n')
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    assert str(caught.value) == (
        f"{tmp_path / 'train.yaml'}:7 sample.prompts[1]: `--s` must be a positive integer, got 'many'"
    )
    aitoolkit = FIXTURES / "aitoolkit_sdxl.yaml"
    text = aitoolkit.read_text().replace("--d 7", "--d -3")
    (tmp_path / "train.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        build_plan(load_trainer_config("train.yaml"))
    line = text[: text.index("--d -3")].count("\n") + 1
    assert str(caught.value) == (
        f"train.yaml:{line} config.process[0].sample.prompts[1]: "
        "`--d` must be a non-negative integer, got '-3'"
    )


def test_unknown_and_unsupported_flags_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, '  prompts: ["a dog --stpes 5 --gr 0.7 --g 3"]\n')
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        request = build_plan(config).requests[0]
    assert (request.prompt, request.steps, request.guidance_scale) == ("a dog", 20, 7.0)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "sample.prompts[0]: unknown flag `--stpes` is ignored; did you mean `--steps`?" in messages
    assert "flag `--gr` is not used by sidecar; ignored" in messages
    assert "`--g` (Flux embedded guidance) is ignored on Stable Diffusion XL" in messages


def test_parse_prompt_flags_keeps_double_dash_inside_words() -> None:
    text, flags = parse_prompt_flags("a well--lit room --N  dark, grainy  --W 640 --steps 12")
    assert text == "a well--lit room"
    assert flags == {"negative": "dark, grainy", "width": 640, "steps": 12}


# ------------------------------------------------------------------ trigger word


def test_trigger_placeholders(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        '  neg: "not [trigger]"\n'
        '  prompts: ["{trigger_word} one", "[trigger] two", "[name] three", "four"]\n',
    )
    requests = build_plan(config).requests
    assert [r.prompt for r in requests] == [
        "tr1g one",
        "tr1g two",
        "tr1g three",
        "four",
    ]  # not added when absent
    assert requests[0].negative_prompt == "not tr1g"


def test_placeholder_without_trigger_warns_and_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(
        tmp_path,
        '  prompts: ["[trigger] holding a sign", "a photo of {trigger_word}, smiling"]\n',
        trigger=None,
    )
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        requests = build_plan(config).requests
    assert [r.prompt for r in requests] == ["holding a sign", "a photo of, smiling"]
    assert sum("used but no `trigger_word` is set; removed" in r.getMessage() for r in caplog.records) == 2


# ------------------------------------------------------------------ wildcards


def test_wildcards_resolve_deterministically() -> None:
    _, plan = plan_of("wildcards.yaml")
    again = build_plan(load_trainer_config(FIXTURES / "wildcards.yaml"))
    assert plan == again
    first, second = plan.requests
    colors = {"red", "blue", "green", "yellow"}
    words = first.prompt.split()
    assert words[0] == "a" and words[1] in colors and words[2] in {"fox", "owl", "wolf", "badger"}
    assert first.prompt.endswith(", w1ld style") and words[5].rstrip(",") in {"forest", "desert", "city"}
    assert "__" not in second.prompt and "{" not in second.prompt  # nested {a|{b|c}} resolved
    assert second.prompt.split()[0] in {"small", "tiny", "huge"}
    assert second.negative_prompt.split()[0] in colors and "comment" not in second.negative_prompt


def test_wildcards_follow_the_seed(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "n.txt").write_text("\n".join(str(i) for i in range(50)))
    picks = set()
    for seed in range(8):
        config = write_config(tmp_path, f'  seed: {seed}\n  prompts: ["__n__ {{a|b|c|d}}"]\n')
        picks.add(build_plan(config).requests[0].prompt)
        assert build_plan(config).requests[0].prompt == build_plan(config).requests[0].prompt
    assert len(picks) > 1


def test_missing_wildcard_file_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, '  prompts:\n    - "a __nothing__ here"\n')
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    assert str(caught.value).startswith(
        f"{tmp_path / 'train.yaml'}:6 sample.prompts[0]: wildcard `__nothing__` needs "
    )


def test_trigger_inside_choices_and_wildcard_files(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "who.txt").write_text("[trigger] the cat\n")
    config = write_config(
        tmp_path, '  prompts: ["{photo of {trigger_word}|photo of {trigger_word}}, __who__"]\n'
    )
    assert build_plan(config).requests[0].prompt == "photo of tr1g, tr1g the cat"


def test_odd_braces_do_not_crash(tmp_path: Path) -> None:
    config = write_config(tmp_path, '  prompts: ["{a|{b|c}} {unclosed|x {|} }"]\n')
    assert build_plan(config).requests[0].prompt


# ------------------------------------------------------------------ the pieces, one at a time


def test_prompt_lines_keep_line_numbers_and_skip_comments() -> None:
    assert prompt_lines("# header\n\n  a cat --w 512  \n# another\nb dog\n") == [
        (3, "a cat --w 512"),
        (5, "b dog"),
    ]


def test_parse_prompt_flags_without_an_origin_raises_an_unlocated_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_prompt_flags("a cat --w wide")
    assert str(caught.value) == "`--w` must be a positive integer, got 'wide'"
    assert parse_prompt_flags("a cat --ss DPM++ 2M Karras --m -0.5") == (
        "a cat",
        {"sampler": "dpm++ 2m karras", "strength": -0.5},
    )


def test_apply_trigger_replaces_every_placeholder() -> None:
    text = "{trigger_word}, [trigger] and [name]"
    assert apply_trigger(text, "tr1g") == "tr1g, tr1g and tr1g"
    assert apply_trigger("no placeholder", "tr1g") == "no placeholder"  # not added where absent
    assert apply_trigger("[trigger] , a cat,  [name]", None) == "a cat"  # removed and tidied


def test_wildcards_must_stay_inside_the_wildcards_folder(tmp_path: Path) -> None:
    config = write_config(tmp_path, '  prompts: ["a"]\n')
    origin = Origin(config, subpath="sample.prompts[0]")
    (tmp_path / "wildcards" / "style").mkdir(parents=True)
    (tmp_path / "wildcards" / "style" / "ink.txt").write_text("# comment\n\nsumi-e\n")
    (tmp_path / "wildcards" / "empty.txt").write_text("# nothing\n")
    wildcards = Wildcards(tmp_path / "wildcards")
    assert wildcards.resolve("__style/ink__ cat", random.Random(0), origin) == "sumi-e cat"
    (tmp_path / "secret.txt").write_text("password\n")
    assert wildcards.resolve("__../secret__", random.Random(0), origin) == "__../secret__"  # not a wildcard
    with pytest.raises(ConfigError, match=r"wildcard `__style/\.\./\.\./secret__` must name a file inside"):
        wildcards.options("style/../../secret", origin)
    with pytest.raises(ConfigError, match=r"wildcard `__empty__`: .*empty\.txt has no options"):
        wildcards.resolve("__empty__", random.Random(0), origin)


def test_a_wildcard_that_names_itself_stops_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, '  prompts: ["a"]\n')
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "loop.txt").write_text("more __loop__\n")
    origin = Origin(config, file=tmp_path / "p.txt", line=2)
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        text = Wildcards(tmp_path / "wildcards").resolve("__loop__", random.Random(0), origin)
    assert text.endswith("__loop__") and text.count("more") == 10
    assert f"{tmp_path / 'p.txt'}:2: wildcards still unresolved after 10 rounds" in caplog.text
