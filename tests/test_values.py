"""sidecar/values.py: the value rules shared by the trainer config, prompt flags and sidecar's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar.values import (
    Flag,
    PositiveInt,
    Section,
    as_arch,
    as_bool,
    as_image_format,
    as_negative_prompt,
    as_non_negative_int,
    as_non_negative_number,
    as_number,
    as_path,
    as_positive_int,
    as_quantize,
    as_regex,
    as_sampler,
    as_text,
    choice,
    describe_error,
    show,
)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        ({"a": 1}, "a mapping"),
        ([1], "a list"),
        ("x", "'x'"),
        (3, "3"),
        (2.5, "2.5"),
    ],
)
def test_show_writes_values_as_the_user_wrote_them(value: object, shown: str) -> None:
    assert show(value) == shown


@pytest.mark.parametrize(("value", "expected"), [(20, 20), ("20", 20), (" +7 ", 7), (4.0, 4)])
def test_positive_int_accepts_integers_quoted_or_not(value: object, expected: int) -> None:
    assert as_positive_int(value) == expected


@pytest.mark.parametrize("value", [0, -3, "twenty", 2.5, True, None, "1e3"])
def test_positive_int_refuses_the_rest(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        as_positive_int(value)
    assert str(caught.value) == f"must be a positive integer, got {show(value)}"


def test_non_negative_int_allows_zero() -> None:
    assert as_non_negative_int(0) == 0 and as_non_negative_int("42") == 42
    with pytest.raises(ValueError, match="must be a non-negative integer, got -1"):
        as_non_negative_int(-1)


def test_numbers() -> None:
    assert as_number("4.5") == 4.5 and as_number(-2) == -2.0
    assert as_non_negative_number(0) == 0.0
    with pytest.raises(ValueError, match="must be a non-negative number, got -2"):
        as_non_negative_number(-2)
    with pytest.raises(ValueError, match=r"must be a number >= 1.5, got 1"):
        as_number(1, minimum=1.5)
    for bad in ("nan", "inf", True, None, "x"):
        with pytest.raises(ValueError, match="must be a number"):
            as_number(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("yes", True), (" Off ", False), ("TRUE", True)],
)
def test_bool_accepts_yaml_words(value: object, expected: bool) -> None:
    assert as_bool(value) is expected


def test_bool_refuses_other_values() -> None:
    for bad in ("maybe", 2, None, 1.5):
        with pytest.raises(ValueError, match="must be true or false"):
            as_bool(bad)


def test_text_and_negative_prompt() -> None:
    assert as_text("a") == "a" and as_text(1234) == "1234" and as_text(1.5) == "1.5"
    with pytest.raises(ValueError, match="must be a string, got true"):
        as_text(True)
    assert as_negative_prompt(False) == "" and as_negative_prompt(None) == ""
    assert as_negative_prompt("blurry") == "blurry"


def test_sampler_image_format_and_arch() -> None:
    assert as_sampler("  Euler_A ") == "euler_a"
    with pytest.raises(ValueError, match="must be a sampler name such as 'euler', got a list"):
        as_sampler(["euler"])
    assert [as_image_format(v) for v in ("PNG", ".jpeg", "jpg", "webp")] == ["png", "jpg", "jpg", "webp"]
    with pytest.raises(ValueError, match="must be one of png, jpg, jpeg, webp, got 'gif'"):
        as_image_format("gif")
    assert (as_arch("SD3.5"), as_arch("xl"), as_arch("flux-dev")) == ("sd3", "sdxl", "flux")
    assert (as_arch("zimage:turbo"), as_arch("qwen_image_edit_plus:2511"), as_arch("sd15")) == (
        "zimage",
        "qwen_image_edit_plus",
        "sd15",
    )  # ai-toolkit's UI writes a variant after a colon
    with pytest.raises(ValueError, match=r"must be one of sdxl, sd3, chroma, .*, got 'sd2'"):
        as_arch("sd2")


def test_path_regex_and_quantize() -> None:
    assert as_path(" ~/x ") == Path("~/x").expanduser()
    with pytest.raises(ValueError, match="must be a path, got ''"):
        as_path("")
    assert as_regex(r"a_(\d+)") == r"a_(\d+)"
    with pytest.raises(ValueError, match="must be a valid regular expression"):
        as_regex("a_(")
    assert as_quantize(True) is True and as_quantize("no") is False and as_quantize("QFloat8") == "qfloat8"
    with pytest.raises(ValueError, match="must be true, false or a quantization type"):
        as_quantize(3)


def test_choice_accepts_options_and_aliases_case_insensitively() -> None:
    rule = choice("none", "model", aliases={"cpu": "model"})
    assert (rule("NONE"), rule(" model "), rule("cpu")) == ("none", "model", "model")
    with pytest.raises(ValueError) as caught:
        rule("disk")
    assert str(caught.value) == "must be one of none, model, got 'disk'"  # aliases are not advertised


class _Example(Section):
    count: PositiveInt
    flag: Flag = False


def test_rules_keep_their_message_as_the_whole_pydantic_error() -> None:
    with pytest.raises(ValidationError) as caught:
        _Example.model_validate({"count": "many"})
    [error] = caught.value.errors(include_url=False)
    assert error["loc"] == ("count",)
    assert describe_error(error) == "must be a positive integer, got 'many'"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [({}, "is required"), ([], "must be a mapping, got a list"), ("x", "must be a mapping, got 'x'")],
)
def test_describe_error_for_pydantic_kinds(raw: object, expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _Example.model_validate(raw)
    assert describe_error(caught.value.errors(include_url=False)[0]) == expected


def test_describe_error_of_a_model_validator_is_its_own_message() -> None:
    error = {"type": "value_error", "loc": (), "msg": "Value error, `a` and `b` conflict", "input": {}}
    assert describe_error(error) == "`a` and `b` conflict"


def test_section_ignores_unknown_keys_and_empty_values() -> None:
    section = _Example.model_validate({"count": 2, "flag": None, "typo": 1})
    assert (section.count, section.flag) == (2, False)
    assert section.model_fields_set == {"count"}
    with pytest.raises(ValidationError):
        section.count = 3  # type: ignore[misc]  # frozen
