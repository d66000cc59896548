"""A family's options: a frozen dataclass whose every field is a flag of the same name.

Most fields are generic flags (``--max_pixels``, ``--latent_sample``): the run configuration has a field of
that name and the CLI defines the flag. A flag only one family has is declared by that family, on its own
options field, with :func:`family_flag`: its help, type and choices travel with the field, the CLI gathers
every registered family's flags into one group (``diffsplit train --help`` shows them), and the run
configuration carries their values in ``TrainConfig.family_flags``. Generic code never names one.

A *model fact* (:func:`model_fact`) is an options field no flag sets: the family's ``configure`` reads it from
the given models' configs (which conditions the denoiser takes, say) before the graph is built, so the same
command trains every variant of a family and the fact enters the cache's identity like any option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

FLAG_KEY = "diffsplit_flag"
"""The dataclass field metadata key of a family's own flag (:class:`FamilyFlag`)."""
FACT_KEY = "diffsplit_model_fact"
"""The dataclass field metadata key of a model fact (:func:`model_fact`): what it says, for readers."""


@dataclass(frozen=True)
class FamilyFlag:
    """How a family's own option is given on the command line (``argparse`` terms).

    Attributes:
        help: the one-line ``--help`` text.
        type: ``str -> value`` for a valued flag; None for a switch (``store_true``, default False).
        choices: the values it accepts, or None.
        metavar: the value's name in ``--help``.
    """

    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None

    def argparse_kwargs(self, default: Any) -> dict[str, Any]:
        """The keyword arguments of ``parser.add_argument`` for this flag with ``default``."""
        if self.type is None:
            return {"action": "store_true", "help": self.help}
        out: dict[str, Any] = {"type": self.type, "default": default, "help": self.help}
        if self.choices is not None:
            out["choices"] = self.choices
        if self.metavar is not None:
            out["metavar"] = self.metavar
        return out


def family_flag(
    default: Any,
    help: str,
    *,
    type: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """An options field that is a flag of this family's own (``some_switch: bool = family_flag(False, "...")``).

    A switch (``type`` None) must default to False; a valued flag takes ``type`` (and ``choices``).
    """
    if type is None and default is not False:
        raise ValueError("a switch (no type) defaults to False")
    flag = FamilyFlag(help=help, type=type, choices=choices, metavar=metavar)
    return dataclasses.field(default=default, metadata={FLAG_KEY: flag})


def model_fact(default: Any, doc: str) -> Any:
    """An options field read from the models, not given as a flag (``Family.configure`` sets it; ``doc`` says
    what it means). ``options_from_config`` leaves it at ``default``."""
    return dataclasses.field(default=default, metadata={FACT_KEY: doc})


def own_flags(options_type: type) -> Iterator[tuple[str, FamilyFlag, Any]]:
    """``(name, flag, default)`` of each field of ``options_type`` that is the family's own flag."""
    for f in dataclasses.fields(options_type):
        flag = f.metadata.get(FLAG_KEY)
        if flag is not None:
            yield f.name, flag, f.default


def options_from_config(options_type: type, config: Any) -> Any:
    """The family's options dataclass, each field taken from the run configuration's field of the same name
    (a family's own flag from ``config.family_flags``, its default when the configuration does not hold it).

    Every option is a flag by construction: a generic field without a flag is a bug in the family and fails
    here (a test builds every family's options from the default configuration).
    """
    values = {}
    own = getattr(config, "family_flags", {})
    for f in dataclasses.fields(options_type):
        if FACT_KEY in f.metadata:
            continue  # the family's configure reads it from the models
        if FLAG_KEY in f.metadata:
            values[f.name] = own.get(f.name, f.default)
            continue
        if not hasattr(config, f.name):
            raise TypeError(
                f"{options_type.__name__}.{f.name} is no flag (the run configuration has no such field)"
            )
        values[f.name] = getattr(config, f.name)
    return options_type(**values)
