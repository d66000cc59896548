"""What made a cache: its identity dict, the fingerprint that decides resume or refusal, and the one-line
explanation of a mismatch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from diffsplit.errors import UserError

_MAX_SHOWN = 80  # characters of a value shown in a mismatch message


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal for equal values, whatever the key order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def fingerprint(identity: Mapping[str, Any]) -> str:
    """The sha256 hex digest of the canonical JSON (sorted keys, no spaces) of ``identity``.

    Key order and tuple-vs-list do not change the fingerprint; any value change does.
    """
    return hashlib.sha256(canonical(identity).encode("utf-8")).hexdigest()


_ABSENT = object()  # a key missing on one side of a comparison (distinct from a stored null)


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else canonical(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The dotted path of the first differing leaf (sorted key order) with both values, or None."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(
                old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else str(key)
            )
            if found is not None:
                return found
        return None
    # Lists are compared whole: an element index says less to a user than the two lists side by side.
    if old is _ABSENT or new is _ABSENT or canonical(old) != canonical(new):
        return path, old, new
    return None


def check_identity(
    cached: Mapping[str, Any],
    expected: Mapping[str, Any],
    keys: Sequence[str],
    where: str,
    *,
    hint: str = "",
) -> None:
    """Raise a :class:`UserError` naming the first key of ``keys`` whose value differs.

    For dict values the message names the first differing sub-key (dotted, e.g. ``vae.sha256``) with both
    values, long values truncated: ``"{where} was made with other preprocessing (max_pixels: 1048576 in the
    cache, 4096 now)"``, followed by ``"; {hint}"`` when a hint is given. Tuples and lists compare equal, as
    they do once stored as JSON.
    """
    for key in keys:
        found = _first_difference(cached.get(key, _ABSENT), expected.get(key, _ABSENT))
        if found is None:
            continue
        sub, old, new = found
        detail = f"{sub}: " if sub else ""
        message = f"{where} was made with other {key} ({detail}{_show(old)} in the cache, {_show(new)} now)"
        raise UserError(message + (f"; {hint}" if hint else ""))
