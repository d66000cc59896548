"""The docs check: every shell command in ``README.md`` and ``docs/*.md`` still matches the tool.

* The quick start's test command is exactly what ``.ci/run`` runs.
* Every ``diffsplit ...`` command and every seed-style ``train.py`` command (``accelerate launch`` or
  ``python``) parses with the real command line: its subcommand, every flag and every value (types,
  choices). Commands with a placeholder (``...``, ``<...>``, ``CACHE``) are checked flag by flag.
* Every script, example and benchmark a command names exists.
* The ``make-tiny`` and ``make-example-dataset`` commands run, in a scratch folder.

The training commands themselves run elsewhere in the suite on the tiny models (the seed's three commands,
each family's seed-style command and split script, the demo).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from diffsplit import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|\bCACHE\b|\bCACHES\b|\bDIR\b")


def commands(page: Path) -> list[str]:
    """The commands of ``page``'s shell blocks: continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"```shell\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


ALL = [(page.relative_to(REPO).as_posix(), command) for page in PAGES for command in commands(page)]


def _subparsers() -> dict[str, object]:
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps no public map


def cli_argv(command: str) -> list[str] | None:
    """``diffsplit``'s argv for a command that runs diffsplit (directly or through a seed-style train.py),
    else None."""
    for part in command.split("&&"):
        tokens = shlex.split(part.strip())
        if tokens[:1] == ["diffsplit"]:
            return tokens[1:]
        scripts = [i for i, t in enumerate(tokens) if t.endswith("model_training/train.py")]
        if scripts and tokens[0] in ("accelerate", "python", "python3"):
            return ["train", *tokens[scripts[0] + 1 :]]
    return None


def test_the_pages_have_commands_and_the_readme_is_short() -> None:
    assert len(ALL) > 20
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_the_quick_start_test_command_is_what_ci_runs() -> None:
    quick = [c for page, c in ALL if page == "README.md" and c.startswith("pip install")]
    assert len(quick) == 2 and "diffsplit demo" in quick[0]
    assert quick[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize(("page", "command"), ALL, ids=[f"{p}:{i}" for i, (p, _) in enumerate(ALL)])
def test_every_command_parses_and_names_files_that_exist(page: str, command: str) -> None:
    for token in shlex.split(command):
        if re.match(r"^(examples|benchmarks)/\S+\.(py|sh)$", token):
            assert (REPO / token).is_file(), f"{page}: {token} does not exist"
    argv = cli_argv(command)
    if argv is None:
        return
    subparsers = _subparsers()
    assert argv and argv[0] in subparsers, f"{page}: unknown subcommand in {command!r}"
    if PLACEHOLDER.search(command):
        known = {o for a in subparsers[argv[0]]._actions for o in a.option_strings}  # noqa: SLF001
        flags = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"{page}: {command!r} uses unknown flags {unknown}"
        return
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exit_:
        raise AssertionError(f"{page}: {command!r} does not parse") from exit_


MAKE = sorted({c for _, c in ALL if re.match(r"^diffsplit make-(tiny|example-dataset) ", c) and not PLACEHOLDER.search(c)})


def test_the_make_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert MAKE, "no make-tiny / make-example-dataset command in the docs"
    # Teacher datasets need their model first: make-tiny before make-example-dataset.
    for command in sorted(MAKE, key=lambda c: "make-example-dataset" in c):
        assert cli.main(shlex.split(command)[1:]) == 0, command
