"""``--customized_optimizer``: the optimizer class a run trains with, named by its dotted path (the seed
trainer's flag), checked before any work: a package that is not installed or a name that is no optimizer is
one line."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from diffsplit.errors import UserError

FLAG = "--customized_optimizer"
DEFAULT = "torch.optim.AdamW"


def optimizer_class(path: str | None) -> type[torch.optim.Optimizer]:
    """The class ``path`` names (``torch.optim.Adam``, ``bitsandbytes.optim.AdamW8bit``); AdamW when None.

    Raises:
        UserError: one line, for a path without a module, a module that does not import (naming the package
            to install), or a name that is not a ``torch.optim.Optimizer`` subclass.
    """
    path = (path or DEFAULT).strip()
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise UserError(f"{FLAG} {path!r}: give the optimizer's dotted class path, e.g. torch.optim.Adam")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        package = (err.name or module_name).split(".")[0]
        raise UserError(
            f"{FLAG} {path}: the package '{package}' is not installed (pip install {package})"
        ) from None
    except Exception as err:  # noqa: BLE001 - a package that fails to import (no GPU for bitsandbytes, ...)
        raise UserError(
            f"{FLAG} {path}: importing {module_name} failed ({' '.join(str(err).split())[:200]})"
        ) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"{FLAG} {path}: {module_name} has no optimizer class '{class_name}'")
    return cls


def make_optimizer(path: str | None, params: Iterable[Any], learning_rate: float, weight_decay: float) -> Any:
    """The optimizer over ``params`` with the run's learning rate, and its weight decay when it takes one."""
    cls = optimizer_class(path)
    kwargs: dict[str, Any] = {"lr": learning_rate}
    if "weight_decay" in inspect.signature(cls.__init__).parameters:
        kwargs["weight_decay"] = weight_decay
    return cls(list(params), **kwargs)
