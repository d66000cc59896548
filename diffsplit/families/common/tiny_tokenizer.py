"""An offline Qwen2-style tokenizer for tiny test models: a small byte-level BPE with Qwen2's pre-tokenizer
and added tokens, saved as a real ``Qwen2Tokenizer`` folder (``tokenizer.json``, ``tokenizer_config.json``,
``vocab.json``, ``merges.txt``).

Qwen2.5-VL and Qwen3 text encoders both read text through this tokenizer class, so every family whose
encoder is one of them builds its tiny tokenizer here, with its own corpus (the words of its prompt
template, so the template encodes to as many tokens as with the real vocabulary) and, where its pipeline
calls ``apply_chat_template``, its chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2's special tokens, in the real tokenizer's order (their ids follow the BPE vocabulary)."""

ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
"""Ordinary added tokens of Qwen2.5 (not skipped when decoding)."""

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "grey", "brown")
SHAPES = ("circle", "square", "triangle", "star", "ring", "stripe", "rectangle", "ellipse")
EXTRA_WORDS = (
    "a an the on in with and of photo picture painting drawing dog cat bird tree house car flower sky sea "
    "mountain city street person woman man child sunset night day small large big little bright dark soft "
    "light left right top bottom middle center near far two three four many one cute beautiful old new"
)
"""Words of ordinary prompts (the example datasets draw theirs from COLOURS and SHAPES)."""


def train_qwen2_tokenizer(
    directory: str | Path,
    template_text: str,
    *,
    extra_tokens: Sequence[str] = (),
    chat_template: str | None = None,
) -> Any:
    """Train a small byte-level BPE and save it in ``directory`` as a Qwen2 tokenizer; return it reloaded.

    Args:
        directory: the tokenizer folder to write.
        template_text: the family's prompt-template text; repeated in the corpus so that each of its words
            becomes one token, as with the real vocabulary.
        extra_tokens: more special tokens after Qwen2's (e.g. Qwen3's ``<think>``/``</think>``).
        chat_template: a Jinja chat template stored with the tokenizer (``apply_chat_template``).

    Returns:
        The transformers tokenizer loaded back from ``directory`` (what a user loading the folder gets).
    """
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from transformers import AddedToken, AutoTokenizer, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    directory = Path(directory)
    # Same normaliser and pre-tokenizer as Qwen2Tokenizer builds, so the trained merges apply to the same
    # pre-tokens at encode time.
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    corpus = [template_text] * 8 + [EXTRA_WORDS] * 2 + [" ".join(COLOURS)] * 2 + [" ".join(SHAPES)] * 2
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops once every corpus word is one token
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    special = [*SPECIAL_TOKENS, *extra_tokens]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in special]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(directory))
    # vocab.json + merges.txt as in the real repositories, for loaders that build the tokenizer from them.
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return AutoTokenizer.from_pretrained(str(directory))
