"""The folder tree is the architecture: checks that keep the layers apart and families in their folders.

The floors, lowest first (a module imports only from its own floor or below):

    errors.py      the one exception type every layer raises
    planner/       names and numbers: units, the split (no torch models, no disk)
    contract/      what a family declares and gets (Family, ComponentSpec, sizing, images, UnitContext)
    storage/ tasks/ training/    generic machinery over the contract; training knows no family
    families/      one folder per model family, over the contract and planner only
    stages/ tools/ the run and its stages, the demo and example data: the only generic code that may ask
                   the registry (``diffsplit.families``) for a family
    cli/           the command line

* Outside ``diffsplit/families/`` no module names a model family, a family's model classes or its
  repository (comments and docstrings included): generic code speaks of components and units.
* Generic code imports no family module; only the stages, the tools and the command line may import the
  registry (``diffsplit.families`` itself), and training imports nothing under ``diffsplit/families/``.
* A family imports the contract, the planner, ``errors``, ``families/common/`` and its own folder: never
  storage, training, tasks, the stages or another family.
* No import cycle between modules (counting imports inside functions), no module over 600 lines, and an
  import inside a function only with a comment saying why (an optional dependency, start-up time).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

import diffsplit
from diffsplit.families import REGISTRY, get_family

PACKAGE = Path(diffsplit.__file__).parent
MAX_LINES = 600


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The diffsplit modules an import statement loads (``from pkg import mod`` counts ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("diffsplit")]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if not base.startswith("diffsplit"):
        return []
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        is_module = (PACKAGE.parent / full.replace(".", "/")).with_suffix(".py").is_file() or (
            PACKAGE.parent / full.replace(".", "/") / "__init__.py"
        ).is_file()
        out.append(full if is_module else base)
    return out


def _statements(tree: ast.AST, in_function: bool = False):
    """Every import statement under ``tree`` with whether it stands inside a function."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _statements(
            child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        )


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """Module -> ``(imported diffsplit module, line, inside a function)`` for every diffsplit import."""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for path in _modules(PACKAGE):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        out[module] = [
            (name, node.lineno, inside)
            for node, inside in _statements(tree)
            for name in _resolve(module, path, node)
        ]
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# layer -> the diffsplit packages it may import (besides itself); "diffsplit.families" alone is the registry
ALLOWED: dict[str, tuple[str, ...]] = {
    "diffsplit.errors": (),
    "diffsplit.planner": ("diffsplit.errors",),
    "diffsplit.contract": ("diffsplit.errors", "diffsplit.planner"),
    "diffsplit.storage": ("diffsplit.errors", "diffsplit.planner", "diffsplit.contract"),
    "diffsplit.tasks": ("diffsplit.errors", "diffsplit.planner", "diffsplit.contract"),
    "diffsplit.training": (
        "diffsplit.errors", "diffsplit.planner", "diffsplit.contract", "diffsplit.storage", "diffsplit.tasks",
    ),
    "diffsplit.families": ("diffsplit.errors", "diffsplit.planner", "diffsplit.contract"),
    "diffsplit.stages": (
        "diffsplit.errors", "diffsplit.planner", "diffsplit.contract", "diffsplit.storage", "diffsplit.tasks",
        "diffsplit.training", "diffsplit.families",
    ),
    "diffsplit.tools": (
        "diffsplit.errors", "diffsplit.planner", "diffsplit.contract", "diffsplit.storage", "diffsplit.tasks",
        "diffsplit.training", "diffsplit.families", "diffsplit.stages",
    ),
    "diffsplit.cli": (
        "diffsplit.errors", "diffsplit.planner", "diffsplit.contract", "diffsplit.storage", "diffsplit.tasks",
        "diffsplit.training", "diffsplit.families", "diffsplit.stages", "diffsplit.tools",
    ),
}  # fmt: skip


def _layer(module: str) -> str:
    return next(layer for layer in ALLOWED if _under(module, layer))


def _family_folder(module: str) -> str | None:
    """``diffsplit.families.<folder>`` of a module inside a family folder or ``common/``; None for the registry."""
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) > 2 and parts[1] == "families" else None


def _allowed(module: str, imported: str) -> bool:
    layer = _layer(module)
    if _under(imported, layer) and layer != "diffsplit.families":
        return True
    if layer == "diffsplit.families":
        own = _family_folder(module)
        if imported == "diffsplit.families" or _under(imported, "diffsplit.families.common"):
            return True  # the registry (an extending family asks it for its base) and the shared blocks
        if own is not None and _under(imported, own):
            return True
        if _under(imported, "diffsplit.families"):
            return module == "diffsplit.families"  # the registry names the family packages as strings only
    if imported != "diffsplit.families" and _under(imported, "diffsplit.families"):
        return False  # generic code never imports a family module, only the registry
    return any(_under(imported, allowed) for allowed in ALLOWED[layer])


def test_imports_flow_one_way() -> None:
    offenders = [
        f"{module} imports {imported} (line {line})"
        for module, imports in _imports().items()
        for imported, line, _ in imports
        if not _allowed(module, imported)
    ]
    assert not offenders, "\n".join(offenders)


def test_training_knows_no_family() -> None:
    offenders = [
        f"{module} imports {imported}"
        for module, imports in _imports().items()
        if _under(module, "diffsplit.training")
        for imported, _, _ in imports
        if _under(imported, "diffsplit.families")
    ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle() -> None:
    graph = nx.DiGraph()
    for module, imports in _imports().items():
        graph.add_node(module)
        graph.add_edges_from((module, imported) for imported, _, _ in imports if imported != module)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:20])


def test_function_level_imports_say_why() -> None:
    """An import inside a function is there for an optional dependency or start-up time, and says so in a
    comment on its line or in the lines just above it (a block of imports shares one comment)."""
    offenders = []
    for path in _modules(PACKAGE):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, inside in _statements(ast.parse("\n".join(lines))):
            if not inside:
                continue
            row = node.lineno - 1
            while row > 0 and re.match(r"\s*(from \S+ )?import ", lines[row - 1]):
                row -= 1  # the first import of a block
            if "#" not in lines[node.lineno - 1] and not any(
                "#" in lines[r] for r in range(max(0, row - 3), row)
            ):
                offenders.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                )
    assert not offenders, "imports inside functions without a comment saying why:\n" + "\n".join(offenders)


def test_no_module_over_the_limit() -> None:
    long = [
        f"{p.relative_to(PACKAGE.parent)}: {n} lines"
        for p in _modules(PACKAGE)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_rules_catch_what_they_forbid() -> None:
    """The rule itself, on imports that would break it (so a broken checker cannot pass silently)."""
    assert not _allowed("diffsplit.training.loop", "diffsplit.families")
    assert not _allowed("diffsplit.training.loop", "diffsplit.families.common.collate")
    assert not _allowed("diffsplit.stages.run", "diffsplit.families.common.collate")
    assert _allowed("diffsplit.stages.run", "diffsplit.families")
    assert not _allowed("diffsplit.storage.data", "diffsplit.families")
    assert not _allowed("diffsplit.contract.family", "diffsplit.storage.models")
    assert not _allowed("diffsplit.families.alpha.units", "diffsplit.storage.models")
    assert not _allowed("diffsplit.families.alpha.units", "diffsplit.training.lora")
    assert not _allowed("diffsplit.families.alpha.units", "diffsplit.families.beta.units")
    assert _allowed("diffsplit.families.alpha.units", "diffsplit.families.alpha.components")
    assert _allowed("diffsplit.families.alpha.units", "diffsplit.families.common.flow_match")
    assert _allowed("diffsplit.families.alpha.units", "diffsplit.contract.sizing")
    assert not _allowed("diffsplit.planner.graph", "diffsplit.contract.family")
