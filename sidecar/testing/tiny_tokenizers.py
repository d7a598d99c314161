"""Byte-level tokenizers for the tiny language-model text encoders, built in memory.

Qwen2.5-VL, Qwen3 and Mistral tokenizers are byte-level BPE: with no merges every byte is a
token, which is all a random-weight tiny model needs. The special tokens and chat templates
are the ones the pipelines' `encode_prompt` relies on: Qwen's `<|im_start|>` / vision tokens
and a template that honours `enable_thinking` (Z-Image, Flux.2 Klein), Mistral's role
messages whose content is a list of parts (Flux.2).
"""

from __future__ import annotations

QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
# Qwen's ChatML with Qwen3's thinking switch (`enable_thinking=False` adds an empty think block).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# Mistral's instruct format, content as a list of text parts (Flux.2's `format_input`).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}{% endfor %}"
)
MAX_LENGTH = 2048  # longer than any padded prompt the pipelines ask for (Qwen-Image: 1024 + 34)


def _byte_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    return {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}


def make_qwen_tokenizer():
    """A Qwen2 tokenizer: every byte a token, `<|endoftext|>` as pad and eos, Qwen's specials."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=_byte_vocab(), merges=[], model_max_length=MAX_LENGTH)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def make_mistral_tokenizer():
    """A Mistral-style tokenizer: every byte a token, `<s>` / `</s>` / `<pad>`, the instruct template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _byte_vocab()
    for special in ("<unk>", "<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_LENGTH,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]}
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def make_qwen_vl_processor(tokenizer):
    """Qwen2-VL's processor around `tokenizer` (its image processor's defaults: 14 px patches).

    transformers builds it with a video processor that needs torchvision; without it this
    raises ImportError, as loading a real Qwen-Image-Edit model does.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "Qwen2-VL's processor needs torchvision (its video processor imports it)"
        ) from error
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
