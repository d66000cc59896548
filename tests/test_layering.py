"""The folder tree is the architecture: checks that keep the layers apart and families in their folders.

* Outside ``diffsplit/families/`` no module names a model family, a family's model classes or its
  repository (comments and docstrings included): generic code speaks of components and units.
* Data flows one way: the planner imports neither storage, training nor families; storage imports no family
  and no training; training imports no entry point; a family imports no entry point and no other family.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import diffsplit
from diffsplit.families import EXTENDS, REGISTRY, get_family

PACKAGE = Path(diffsplit.__file__).parent


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _family_words() -> list[re.Pattern[str]]:
    """What would name a family: its name in every spelling, its repository id, its model classes."""
    words: set[str] = set()
    for name in REGISTRY:
        family = get_family(name)
        stem = name.split("-")[0]
        for spelling in (name, name.replace("-", "_"), name.replace("-", "")):
            words.add(spelling)
        if len(stem) >= 4:  # "qwen" of "qwen-image"; a short stem ("z") is no word of its own
            words.add(stem)
        words.add(family.example.model_id)
        words.update(c for c in family.model_classes)
    return [
        re.compile(rf"(?<![A-Za-z0-9]){re.escape(w)}(?![A-Za-z0-9])", re.IGNORECASE) for w in sorted(words)
    ]


def test_no_generic_module_names_a_family() -> None:
    words = _family_words()
    offenders = []
    for path in _modules(PACKAGE):
        if path.is_relative_to(PACKAGE / "families"):
            continue
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            hits = [w.pattern for w in words if w.search(line)]
            if hits:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "generic code names a family:\n" + "\n".join(offenders)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return {name for name in out if name.startswith("diffsplit")}


FORBIDDEN = {
    "planner": ("diffsplit.storage", "diffsplit.training", "diffsplit.families", "diffsplit.stages.run"),
    "storage": (
        "diffsplit.families",
        "diffsplit.training",
        "diffsplit.stages.run",
        "diffsplit.stages.entrypoints",
    ),
    "training": (
        "diffsplit.stages.entrypoints",
        "diffsplit.stages.run",
        "diffsplit.cli",
        "diffsplit.stages.precompute",
    ),
    "tasks": (
        "diffsplit.families.",
        "diffsplit.storage",
        "diffsplit.stages.entrypoints",
        "diffsplit.stages.run",
    ),
}


def test_imports_flow_one_way() -> None:
    offenders = []
    for layer, forbidden in FORBIDDEN.items():
        for path in _modules(PACKAGE / layer):
            for name in _imports(path):
                if any(name == f or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    for name, module in REGISTRY.items():
        folder = PACKAGE.parent / module.replace(".", "/")
        others = [m for n, m in REGISTRY.items() if n != name and EXTENDS.get(name) != n]
        for path in _modules(folder):
            for imported in _imports(path):
                if imported.startswith(
                    ("diffsplit.stages.entrypoints", "diffsplit.stages.run", "diffsplit.cli")
                ) or any(imported == m or imported.startswith(m + ".") for m in others):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {imported}")
    assert not offenders, "\n".join(offenders)
