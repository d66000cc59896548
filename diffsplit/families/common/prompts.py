"""Prompts as the families' text units see them: what to tell the user once per run, and a prompt encoder
cut between its layers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from diffsplit.contract.context import UnitContext
from diffsplit.planner.graph import Unit
from diffsplit.planner.layers import part_name


def note_truncated(ctx: UnitContext, tokenizer: Any, texts: Sequence[str], limit: int) -> None:
    """Count the ``texts`` longer than ``limit`` tokens (the pipeline cuts them there) for the run's one
    notice. Tokenizes once more, untruncated, only when the run listens (``ctx.notes``)."""
    if ctx.notes is None:
        return
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    ctx.note(
        f"prompt(s) longer than the text encoder's limit of {limit} tokens were cut there",
        sum(n > limit for n in lengths),
    )


def cut_prompt_encoder(prefix_fn: Callable[..., Any], suffix_fn: Callable[..., Any]) -> Callable[[int, int], tuple[Unit, Unit]]:
    """The ``Unit.split_at`` of an ``encode_prompt`` whose cut carries one hidden state.

    ``split_at(cut, stop)`` -> the prefix ``encode_prompt[0:cut]`` (``input_ids, attention_mask ->
    text_hidden`` on the part ``text_encoder[0:cut]``) and the suffix ``encode_prompt[cut:stop]``
    (``text_hidden, attention_mask -> prompt_embeds`` on ``text_encoder[cut:stop]``). ``prefix_fn`` and
    ``suffix_fn`` are unit functions taking the part's name as ``model=``.
    """

    def split_at(cut: int, stop: int) -> tuple[Unit, Unit]:
        prefix_model = part_name("text_encoder", 0, cut)
        suffix_model = part_name("text_encoder", cut, stop)
        prefix = Unit(
            name=f"encode_prompt[0:{cut}]",
            inputs=("input_ids", "attention_mask"),
            outputs=("text_hidden",),
            models=(prefix_model,),
            fn=functools.partial(prefix_fn, model=prefix_model),
        )
        suffix = Unit(
            name=f"encode_prompt[{cut}:{stop}]",
            inputs=("text_hidden", "attention_mask"),
            outputs=("prompt_embeds",),
            models=(suffix_model,),
            fn=functools.partial(suffix_fn, model=suffix_model),
        )
        return prefix, suffix

    return split_at
