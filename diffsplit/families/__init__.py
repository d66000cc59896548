"""The registry of model families: one line per family (see :class:`diffsplit.contract.family.Family`).

A run's family is the one whose components the given model folders are (each folder's ``config.json`` names
its class); ``--family`` chooses when the folders fit several, or overrides.

Start-up time: gathering every family's own flags for ``--help`` imports every family package, so a family
module imports diffusers' and transformers' model and pipeline modules inside the functions that use them
(``train --help`` takes 1.6 s that way and 7.4 s with them at module level, measured on this project's
2-core machine with ``time diffsplit train --help``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from diffsplit.contract.options import FamilyFlag, own_flags
from diffsplit.errors import UserError

if TYPE_CHECKING:
    from diffsplit.contract.family import Family


class ModelFolder(Protocol):
    """What recognising a family reads of a resolved model folder (storage's ``ModelEntry`` is one)."""

    folder: Path
    class_names: tuple[str, ...]


REGISTRY: dict[str, str] = {
    "qwen-image": "diffsplit.families.qwen_image",
    "z-image": "diffsplit.families.z_image",
    "flux2-klein": "diffsplit.families.flux2_klein",
    "qwen-image-edit": "diffsplit.families.qwen_image_edit",
    "wan": "diffsplit.families.wan",
}
"""Family name -> the package whose ``FAMILY`` declares it (imported only when the family is used). No family
imports another: what two share is written once in :mod:`diffsplit.families.common`."""


def family_names() -> list[str]:
    """Every registered family name, in registry order."""
    return list(REGISTRY)


def family_flags() -> dict[str, tuple[FamilyFlag, Any, tuple[str, ...]]]:
    """Every registered family's own flags: name -> ``(flag, default, the families declaring it)``.

    Two families may declare the same flag (an extending family inherits its base's options); they must
    then agree on its definition and default.

    Raises:
        TypeError: two families declare one flag name differently (a bug in a family, caught by a test).
    """
    out: dict[str, tuple[FamilyFlag, Any, tuple[str, ...]]] = {}
    for family_name in REGISTRY:
        for name, flag, default in own_flags(get_family(family_name).options):
            if name in out:
                other, other_default, owners = out[name]
                if (other, other_default) != (flag, default):
                    raise TypeError(f"families {owners} and {family_name!r} declare --{name} differently")
                out[name] = (flag, default, (*owners, family_name))
            else:
                out[name] = (flag, default, (family_name,))
    return out


def get_family(name: str) -> Family:
    """The registered family ``name``.

    Raises:
        UserError: naming ``--family`` and the registered names.
    """
    if name not in REGISTRY:
        raise UserError(f"--family {name!r} is not one of: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).FAMILY


def detect_family(
    entries: Sequence[ModelFolder], override: str | None = None, extra_inputs: Sequence[str] = ()
) -> Family:
    """The family whose model components the resolved ``entries`` are (``override``: ``--family``).

    Where the classes fit several families, ``extra_inputs`` (``--extra_inputs``) decides: a family that
    requires extra inputs (an editing model) when they are given, the others when not.

    Raises:
        UserError: no registered family has every entry's class (naming the classes), or several do and no
            ``--family`` chooses.
    """
    if override:
        return get_family(override)
    if not entries:
        raise UserError("no models: give --model_id_with_origin_paths or --model_paths")
    named = ", ".join(f"'{e.folder.name}/' ({', '.join(e.class_names)})" for e in entries)
    return _the_one_fitting(
        [e.class_names for e in entries], f"the model folders {named}", tuple(extra_inputs)
    )


def family_of_repository(
    folder: str | Path, flag: str = "--model", extra_inputs: Sequence[str] = ()
) -> Family:
    """The family of a diffusers repository folder, from the model classes its ``model_index.json`` names
    (``extra_inputs`` chooses among several, as in :func:`detect_family`).

    Raises:
        UserError: no ``model_index.json``, or no (or more than one) registered family fits.
    """
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise UserError(
            f"{flag}: '{folder}' is not a diffusers repository folder (no model_index.json); "
            "`diffsplit make-tiny <family> --output DIR` writes one"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{flag}: cannot read '{index_path}' ({err})") from None
    named = {str(v[1]) for v in index.values() if isinstance(v, list) and len(v) == 2}
    known = set().union(*(get_family(name).model_classes for name in REGISTRY))
    return _the_one_fitting(
        [(c,) for c in sorted(named & known)], f"the repository '{folder}'", tuple(extra_inputs)
    )


def _the_one_fitting(
    class_sets: Sequence[tuple[str, ...]], what: str, extra_inputs: tuple[str, ...] = ()
) -> Family:
    """The registered family that has a component of each class set's classes (and, among several, the one
    the extra inputs select)."""
    families = [get_family(name) for name in REGISTRY]
    fits = [f for f in families if all(set(classes) & f.model_classes for classes in class_sets)]
    if len(fits) > 1:
        given = set(extra_inputs)
        chosen = [f for f in fits if f.requires_extra_inputs == bool(given) and given <= set(f.extra_inputs)]
        fits = chosen or fits
    if len(fits) == 1:
        return fits[0]
    if not fits:
        known = "; ".join(f"{f.name}: {', '.join(sorted(f.model_classes))}" for f in families)
        raise UserError(f"{what} fit no registered model family (known: {known})")
    raise UserError(
        f"{what} fit several model families ({', '.join(f.name for f in fits)}); choose one with --family"
    )
