"""The import structure of recu_cli: no import circle, and no import back up the floors
that docs/architecture.md declares (its "Floors" block is read here, so the two cannot
drift apart). Read from the source with `ast`: every import, at the top, inside a function
or under TYPE_CHECKING, counts; a name a package hands on lazily (a dict of name ->
submodule in its __init__.py, PEP 562) counts as an import of that submodule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "recu_cli"
DOC = REPO / "docs" / "architecture.md"
ROOT = "recu_cli"


def read_floors(doc: str) -> list[list[str]]:
    """The ```floors block: one line per floor, top first: 'N  name name ...', where
    'x.py' is the module recu_cli/x.py, 'x/' every module under recu_cli/x/ and
    '__init__.py' the package's own."""
    block = re.search(r"```floors\n(.*?)```", doc, re.S)
    assert block, f"{DOC} has no ```floors block"
    floors = []
    for n, line in enumerate(block.group(1).strip().splitlines(), start=1):
        number, *names = line.split()
        assert number == str(n) and names, f"floor line {n} of {DOC} is malformed: {line!r}"
        floors.append(names)
    return floors


def module_paths(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package ('recu_cli' is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def lazy_exports(tree: ast.Module, package: str, modules: dict[str, Path]) -> dict[str, str]:
    """name -> submodule for every dict literal of string -> submodule name in a package's
    __init__ (what its __getattr__ imports on first use)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict) or not node.keys:
            continue
        pairs = list(zip(node.keys, node.values, strict=True))
        if all(
            isinstance(k, ast.Constant)
            and isinstance(k.value, str)
            and isinstance(v, ast.Constant)
            and f"{package}.{v.value}" in modules
            for k, v in pairs
        ):
            out.update({k.value: f"{package}.{v.value}" for k, v in pairs})
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (anywhere in its source)."""
    modules = module_paths(package)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    lazy = {
        name: lazy_exports(tree, name, modules)
        for name, tree in trees.items()
        if modules[name].name == "__init__.py"
    }
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        here = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else lazy.get(base, {}).get(alias.name, base))
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                targets.add(str(node.args[0].value))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def floor_of(floors: list[list[str]], modules: list[str]) -> dict[str, int]:
    """Module -> its floor (0 = top), by the most specific name that covers it."""
    covers = {}
    for i, names in enumerate(floors):
        for entry in names:
            if entry == "__init__.py":
                covers[ROOT] = i
            elif entry.endswith("/"):
                covers[f"{ROOT}.{entry[:-1].replace('/', '.')}"] = i
            else:
                covers[f"{ROOT}.{entry.removesuffix('.py').replace('/', '.')}"] = i
    out = {}
    for m in modules:
        prefixes = [p for p in covers if m == p or (p != ROOT and m.startswith(p + "."))]
        if prefixes:
            out[m] = covers[max(prefixes, key=len)]
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def rooms(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between top-level rooms: recu_cli/x.py or the folder recu_cli/x/."""

    def room(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(room(m), set()).update(room(t) for t in targets if room(t) != room(m))
    return out


def problems(package: Path, doc: str) -> list[str]:
    """Every circle and every import back up, one line each (empty: the house is in order)."""
    graph = import_graph(package)
    floors = read_floors(doc)
    floor = floor_of(floors, list(graph))
    out = [f"{m} stands on no floor of {DOC.name}" for m in sorted(graph) if m not in floor]
    out += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    out += [f"import circle between rooms: {' -> '.join(c)}" for c in circles(rooms(graph))]
    for m in sorted(graph):
        for t in sorted(graph[m]):
            if m in floor and t in floor and floor[t] < floor[m]:
                out.append(
                    f"import back up: {m} (floor {floor[m] + 1}) -> {t} (floor {floor[t] + 1})"
                )
    return out


def test_no_import_circle_and_no_import_back_up() -> None:
    found = problems(PACKAGE, DOC.read_text())
    assert found == [], "\n".join(found)


def test_the_reader_sees_every_kind_of_import(tmp_path) -> None:
    """A copy of the package with one import back up (inside a function, under
    TYPE_CHECKING, or through a lazy package name) and one circle is refused: the test
    above can fail."""
    import shutil

    copy = tmp_path / "recu_cli"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "csrc"))
    doc = DOC.read_text()
    assert problems(copy, doc) == []
    schema = copy / "pack" / "schema.py"
    text = schema.read_text()
    for mutant, what in [
        ("def _up():\n    from recu_cli.training.trainer import Trainer\n", "training.trainer"),
        ("if TYPE_CHECKING:\n    from recu_cli.commands import bench\n", "commands.bench"),
        ("def _up():\n    from recu_cli.training import Trainer\n", "training.trainer"),
        ("def _up():\n    from ..stats import totals\n", "recu_cli.stats"),
    ]:
        schema.write_text(text + "\n" + ("from typing import TYPE_CHECKING\n" + mutant))
        found = problems(copy, doc)
        assert any("back up: recu_cli.pack.schema" in f and what in f for f in found), found
    schema.write_text(text)
    (copy / "errors.py").write_text(
        (copy / "errors.py").read_text() + "\nimport recu_cli.console\n"
    )
    (copy / "console.py").write_text(
        (copy / "console.py").read_text() + "\nimport recu_cli.errors\n"
    )
    assert any(
        f.startswith("import circle: recu_cli.console -> recu_cli.errors")
        for f in problems(copy, doc)
    )


def test_every_floor_entry_names_a_module_or_folder() -> None:
    names = [n for floor in read_floors(DOC.read_text()) for n in floor]
    assert {"cli.py", "pack/", "__init__.py"} <= set(names)
    for n in names:
        path = PACKAGE / n
        assert path.is_dir() if n.endswith("/") else path.is_file(), f"{DOC.name}: no {n}"
