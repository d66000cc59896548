"""``--config FILE``: the training flags from a ``.toml`` or ``.json`` file.

Keys are the flag names without dashes (``learning_rate = 1e-4``, ``lora_target_modules = "to_q,to_k"``,
``use_gradient_checkpointing = true``), a family's own flags (``expert = "low"``) and a flag's aliases among
them. Each value goes through the flag's own ``type=`` converter and ``choices``, exactly as the same text on
the command line would, and becomes that flag's parser default (``set_defaults``): a flag given on the command
line overrides the file. A switch takes ``true`` or ``false``; a JSON ``null`` leaves the flag at its default.
Paths in the file are relative to the working directory, as on the command line.

A key whose value differs from the flag's default counts as given (``TrainConfig.given``, for the notices about
flags with no effect), like a flag on the command line; a key at the default changes nothing and is not
counted, so a run repeated from its ``training_args.json`` (which holds every flag) says no more than the
original did.

``<output>/training_args.json`` holds every flag of a run by name and nothing else (a test checks that each of
its keys is a flag), so ``--config <output>/training_args.json`` repeats the run; give ``--output_path`` to
write it elsewhere.

Anything wrong in the file (unreadable, malformed, an unknown key, a value of the wrong type or outside the
flag's choices) is one :class:`~diffsplit.errors.UserError` line naming the file and the key.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from diffsplit.cli.arguments import ALIASES
from diffsplit.errors import UserError
from diffsplit.storage.location import is_remote, location
from diffsplit.storage.metadata import one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FLAG = "--config"
_NOT_KEYS = ("help", "config")


def read_file(path: str | Path) -> dict[str, Any]:
    """The file's top-level table (``.toml``) or object (``.json``), unchecked.

    Raises:
        UserError: naming ``--config`` and the file: an unknown suffix, an unreadable file, malformed text, or
            a top level that is not a table of keys.
    """
    where = f"{FLAG} {path}"
    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"{where}: expected a .toml or .json file, got {suffix or 'no suffix'!r}")
    source = location(path, FLAG)  # a local file, or at a URL (a run's training_args.json in a bucket)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{where}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 text ({err})") from None
    except Exception as err:  # a store's client error (credentials, endpoint): one line too
        if not is_remote(source):
            raise
        raise UserError(f"{where}: cannot read it ({one_line(str(err))})") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as err:
        raise UserError(f"{where}: not valid {suffix[1:].upper()} ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object of flag names and values, got a {type(data).__name__}")
    return data


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by key: each option string without its dashes (aliases included)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for option in action.option_strings:
            key = option.lstrip("-")
            if option.startswith("--") and key not in _NOT_KEYS:
                out[key] = action
    return out


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return kinds.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


def convert(key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` for the flag ``action``, as the command line would turn its text into it.

    Raises:
        ValueError: what is wrong, naming ``key`` (the caller adds the file).
    """
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise ValueError(f"{key} is a switch: expected true or false, got {_describe(value)} {value!r}")
        return action.const if value else action.default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{key}: expected {_expected(action)}, got {_describe(value)} {value!r}")
    if action.type in (None, str) and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {_describe(value)} {value!r}")
    text = value if isinstance(value, str) else repr(value)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{key}: {err}") from None
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", "")
            raise ValueError(f"{key}: invalid {name} value {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"{key}: {value!r} is not one of {choices}")
    return converted


def _expected(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    return "a string" if action.type in (None, str) else "a number or a string"


def file_defaults(path: str | Path, parser: argparse.ArgumentParser) -> tuple[dict[str, Any], set[str]]:
    """The file's values as ``{dest: value}`` for ``parser.set_defaults``, and the dests that count as given.

    Raises:
        UserError: one line naming ``--config``, the file and (where there is one) the key.
    """
    data = read_file(path)
    actions = flag_actions(parser)
    values: dict[str, Any] = {}
    given: set[str] = set()
    keys_of: dict[str, str] = {}
    for key, value in data.items():
        action = actions.get(key)
        if action is None and isinstance(value, dict):
            raise UserError(f"{FLAG} {path}: [{key}] is a table: flags go at the top level, without sections")
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{FLAG} {path}: unknown key {key!r}{hint}")
        if action.dest in keys_of:
            raise UserError(f"{FLAG} {path}: {key!r} and {keys_of[action.dest]!r} set the same flag")
        keys_of[action.dest] = key
        if value is None:  # JSON null: the flag's default
            continue
        try:
            converted = convert(key, value, action)
        except ValueError as err:
            raise UserError(f"{FLAG} {path}: {err}") from None
        values[action.dest] = converted
        if converted != action.default:
            given.add(action.dest)
        if action.dest in ALIASES:  # an alias sets its flag(s) too: the file may not give both
            for target in ALIASES[action.dest][1](converted):
                if target in keys_of:
                    raise UserError(f"{FLAG} {path}: {key!r} and {keys_of[target]!r} set the same flag")
                keys_of[target] = key
    return values, given


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    """The subcommand's own parser (where ``--config`` and the flags it sets live)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> argparse.Namespace:
    """``args`` again with ``--config``'s values as the defaults of the flags the command line did not give.

    The command line is parsed a second time with the file's values as the subcommand's parser defaults (so
    flags on the command line win); ``args.config_given`` holds the flags the file set away from their default.
    Without ``--config``, ``args`` as it is (``config_given`` empty).

    Raises:
        UserError: anything wrong in the file (one line, see :func:`file_defaults`).
    """
    path = getattr(args, "config", None)
    if not path:
        args.config_given = frozenset()
        return args
    sub = subparser(parser, args.command)
    if sub is None:  # pragma: no cover - only commands with the train flags have --config
        raise UserError(f"{FLAG} is not a flag of {args.command}")
    values, given = file_defaults(path, sub)
    sub.set_defaults(**values)
    args = parser.parse_args(argv)
    args.config_given = frozenset(given)
    return args


def with_file_given(config: Any, args: argparse.Namespace) -> Any:
    """``config`` (a :class:`~diffsplit.training.config.TrainConfig`) with the file's keys among its given
    flags."""
    extra = getattr(args, "config_given", frozenset())
    if extra:
        config.given = tuple(sorted(set(config.given) | set(extra)))
    return config
