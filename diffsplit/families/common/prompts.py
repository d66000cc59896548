"""Prompts as the families' tokenizer units see them: what to tell the user once per run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsplit.contract.context import UnitContext


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
