"""Wan 2.2's two experts and their LoRAs, as each trainer writes them.

Wan 2.2 A14B denoises with `transformer` (high noise, t >= `boundary_ratio` x 1000) then
`transformer_2` (low noise). Trainers write a LoRA for either or both:

- ai-toolkit (`extensions_built_in/diffusion_models/wan22/wan22_14b_model.py`, `save_lora`): by
  default two files, `<name>_<step>_high_noise.safetensors` and `..._low_noise.safetensors`
  (`network.split_multistage_loras: true`), only the one of an expert not trained being absent;
  with `split_multistage_loras: false` one file whose keys carry `transformer_1.` / `transformer_2.`.
- musubi-tuner (`docs/wan.md`): one file; trained with `--dit` and `--dit_high_noise` it is one
  LoRA for both experts, with `--dit` alone for the one expert loaded (its own samples then run
  that expert at every step).
- SimpleTuner (`helpers/models/wan/model.py`, `model_flavour` `*-2.2-high` / `*-2.2-low`): one
  diffusers file per run, for the stage the flavour names.

So: a file named `*_high_noise` / `*_low_noise` goes to its expert, with its sibling (looked for
beside it) to the other; a file with `transformer_1.` / `transformer_2.` keys is split between
them; any other file applies to both experts. Key conversion (ComfyUI / ai-toolkit
`diffusion_model.`, musubi `lora_unet_`) is diffusers' own (`WanPipeline.lora_state_dict`);
diffusers' `load_lora_weights(..., load_into_transformer_2=True)` takes one expert at a time, and
`AdapterSlot` drives `transformer` only, hence this slot. The next checkpoint of the same run is
copied into the loaded adapters in place, as `AdapterSlot` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from safetensors.torch import load_file

from sidecar.arch import ArchSpec
from sidecar.errors import LoraError
from sidecar.render.adapters.lora_files import LoraFile, LoraReport, check_applied, inspect_lora
from sidecar.render.adapters.swap import (
    ADAPTER_NAME,
    CONVERSION_ERRORS,
    adapter_names,
    first_line,
    injected_layers,
)
from sidecar.weights import SplitPart, split_part

logger = logging.getLogger("sidecar.render")

HIGH_NOISE = "transformer"
LOW_NOISE = "transformer_2"
EXPERTS = (HIGH_NOISE, LOW_NOISE)
# ai-toolkit's split files (`sidecar.weights.split_part`): the name's suffix says the expert.
SPLIT_EXPERTS: dict[SplitPart, str] = {"high_noise": HIGH_NOISE, "low_noise": LOW_NOISE}
# ai-toolkit's combined file: a key segment says the expert (`diffusion_model.transformer_1.blocks...`).
COMBINED_SEGMENTS = {".transformer_1.": HIGH_NOISE, ".transformer_2.": LOW_NOISE}


def expert_files(path: Path) -> dict[str, Path]:
    """`{expert: file}` for the LoRA at `path`: ai-toolkit's pair from either name (the sibling
    only when it is there), else the one file for both experts."""
    path = Path(path)
    found = split_part(path)
    if found is None:
        return {expert: path for expert in EXPERTS}
    base, _ = found
    files = {expert: path.with_name(f"{base}_{part}{path.suffix}") for part, expert in SPLIT_EXPERTS.items()}
    return {expert: file for expert, file in files.items() if file == path or file.is_file()}


def expert_state_dicts(files: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Each expert's tensors, as stored: a combined file split by its `transformer_1.` /
    `transformer_2.` segments (removed), a file for one expert or both taken whole."""
    loaded: dict[Path, dict[str, torch.Tensor]] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for expert, file in files.items():
        tensors = loaded.setdefault(file, load_file(str(file)))
        if any(segment in key for key in tensors for segment in COMBINED_SEGMENTS):
            part = {}
            for key, value in tensors.items():
                for segment, owner in COMBINED_SEGMENTS.items():
                    if segment in key and owner == expert:
                        part[key.replace(segment, ".", 1)] = value
            if part:
                parts[expert] = part
        else:
            parts[expert] = tensors
    return parts


def _metadata(file: Path) -> dict | None:
    """PEFT's adapter config from the header (diffusers writes `lora_adapter_metadata`), as
    `load_lora_weights` passes it on: it holds `lora_alpha` when that differs from the rank."""
    raw = inspect_lora(file).metadata.get(LORA_ADAPTER_METADATA_KEY)
    return json.loads(raw) if raw else None


class ExpertSlot:
    """`AdapterSlot`'s interface (`apply`, `remove`, `set_strength`, `lora`) over both experts."""

    def __init__(self, pipe: DiffusionPipeline, *, spec: ArchSpec) -> None:
        self.pipe = pipe
        self.spec = spec
        self.lora: LoraFile | None = None
        self._loaded: dict[str, tuple[frozenset[str], str]] = {}  # expert -> (keys, metadata) loaded

    def apply(self, path: str | Path, *, in_place_allowed: bool = True) -> LoraReport:
        """Put the LoRA at `path` (and its sibling expert file) into the experts; raises `LoraError`
        when it applies to nothing, leaving the base without any LoRA."""
        lora = inspect_lora(path)
        files = expert_files(lora.path)
        if lora.format == "lycoris":
            self.remove()
            raise LoraError(f"{lora.path}: LyCORIS files are not supported on Wan 2.2's two experts")
        try:
            converted = {
                expert: self._converted(tensors) for expert, tensors in expert_state_dicts(files).items()
            }
        except CONVERSION_ERRORS as error:
            self.remove()
            raise LoraError(
                f"{lora.path}: diffusers cannot convert this {lora.format} LoRA for {self.spec.label}: "
                f"{first_line(error)}"
            ) from error
        metadata = {expert: json.dumps(_metadata(files[expert]), sort_keys=True) for expert in converted}
        hotswapped = in_place_allowed and self._copy_in_place(converted, metadata)
        if not hotswapped:
            self.remove()
            try:
                for expert, state_dict in converted.items():
                    self._load(expert, state_dict, files[expert])
            except (RuntimeError, ValueError, KeyError) as error:
                self.remove()
                raise LoraError(
                    f"{lora.path}: diffusers could not load this {lora.format} LoRA on {self.spec.label}: "
                    f"{first_line(error)}"
                ) from error
            self._loaded = {expert: (frozenset(sd), metadata[expert]) for expert, sd in converted.items()}
        expected = {
            expert: sum(key.endswith(".lora_A.weight") for key in sd) for expert, sd in converted.items()
        }
        injected = injected_layers({expert: getattr(self.pipe, expert, None) for expert in EXPERTS})
        try:
            check_applied(lora, expected, injected, arch=self.spec.name)
        except LoraError:
            self.remove()
            raise
        missing = [expert for expert in EXPERTS if expert not in converted]
        if missing:
            logger.warning(
                "%s: no LoRA for %s (%s noise) beside it; that expert renders the base model",
                lora.path,
                missing[0],
                "high" if missing[0] == HIGH_NOISE else "low",
            )
        self.lora = lora
        return LoraReport(lora=lora, expected=expected, injected=injected, hotswapped=hotswapped)

    def _converted(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' keys (`transformer.blocks.0.attn1.to_q.lora_A.weight`) for one expert's part;
        a text-to-video LoRA on an image-to-video base gets the zero image-attention layers
        diffusers' loader adds."""
        state_dict = type(self.pipe).lora_state_dict(dict(tensors))
        state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict
        return type(self.pipe)._maybe_expand_t2v_lora_for_i2v(self.pipe.transformer, state_dict)

    def _load(self, expert: str, state_dict: dict[str, torch.Tensor], file: Path) -> None:
        """One expert's adapter, as `load_lora_weights(..., load_into_transformer_2=...)` loads it."""
        type(self.pipe).load_lora_into_transformer(
            dict(state_dict),
            transformer=getattr(self.pipe, expert),
            adapter_name=ADAPTER_NAME,
            metadata=_metadata(file),
            _pipeline=self.pipe,
        )

    def _copy_in_place(self, converted: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> bool:
        """The next checkpoint of the same run: its tensors copied into the loaded adapters."""
        if set(converted) != set(self._loaded) or any(
            (frozenset(sd), metadata[expert]) != self._loaded[expert] for expert, sd in converted.items()
        ):
            return False
        copies: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for expert, state_dict in converted.items():
            parameters = dict(getattr(self.pipe, expert).named_parameters())
            for key, tensor in state_dict.items():
                # `transformer.blocks.0.attn1.to_q.lora_A.weight`: `blocks.0.attn1.to_q.lora_A.sidecar.weight`
                module, kind, leaf = key.removeprefix("transformer.").rsplit(".", 2)
                parameter = parameters.get(f"{module}.{kind}.{ADAPTER_NAME}.{leaf}")
                if parameter is None or parameter.shape != tensor.shape:
                    return False
                copies.append((parameter, tensor))
        with torch.no_grad():
            for parameter, tensor in copies:
                parameter.copy_(tensor)
        return True

    def set_strength(self, strength: float) -> None:
        """Both experts take the strength from the call's `attention_kwargs`."""

    def remove(self) -> None:
        """Unload the LoRA from both experts: the pipeline renders the base model again."""
        if ADAPTER_NAME in adapter_names(self.pipe):
            self.pipe.delete_adapters(ADAPTER_NAME)
        self._loaded = {}
        self.lora = None
