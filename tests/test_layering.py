"""The package's layering, read from its imports (`ast`, nothing is imported).

    commands        distil_flax/*.py: main, finetune, export_hf, export_onnx, ...
    jobs            distill/  downstream/  embeddings/      (none imports another)
    interop         interop/: hf/, sentence-transformers, ONNX, sources
    foundations     data/  losses/  training/
    model           model/

A module imports only from its own tier or the tiers below, commands import no other command
and the jobs none of each other; there is no import cycle between modules, no import of
distil_flax inside a function or an `if` (the way a cycle is papered over: a late import stays
allowed only for optional third-party libraries), and no module uses another's `_private` names.
"""

import ast
import os
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "distil_flax"
TIERS = (("commands",), ("distill", "downstream", "embeddings"), ("interop",),
         ("data", "losses", "training"), ("model",))
# Tiers whose members must not import each other.
INDEPENDENT = {"commands", "distill", "downstream", "embeddings"}


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name → file, for every module of the package at `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _group(module: str, modules: dict[str, pathlib.Path]) -> str:
    """The tier member a module belongs to: its subpackage, or "commands" for a top-level one."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if len(parts) == 2 and not modules[module].name == "__init__.py":
        return "commands"
    return parts[1]


def _imports(tree: ast.Module, module: str, modules: dict[str, pathlib.Path]):
    """(imported module, imported names, top level?, line) of each import of the package."""
    top = {id(node) for node in tree.body}
    root = module.split(".")[0]
    is_package = modules[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # Relative: resolve against this module's package.
                anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != root:
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                yield (target if target in modules else base, alias.name, id(node) in top,
                       node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    yield alias.name, None, id(node) in top, node.lineno


def _aliases(tree: ast.Module, modules: dict[str, pathlib.Path]) -> set[str]:
    """Local names bound to modules of the package (`from distil_flax import model as m`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    names.add(alias.asname or alias.name)
    return names


def violations(root: pathlib.Path) -> list[str]:
    """Every breach of the layering of the package at `root`, one line each."""
    modules = _modules(root)
    rank = {member: i for i, tier in enumerate(TIERS) for member in tier}
    problems, edges = [], {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        here = _group(module, modules)
        where = f"{path.relative_to(root.parent)}"
        for target, name, top, line in _imports(tree, module, modules):
            if target not in modules:
                continue
            edges[module].add(target)
            if not top:
                problems.append(f"{where}:{line}: imports {target} late (inside a function or "
                                "an if)")
            if name and name.startswith("_") and not name.startswith("__"):
                problems.append(f"{where}:{line}: imports {target}'s private {name}")
            there = _group(target, modules)
            if here == "package" or there in ("package", here) and here != "commands":
                continue
            if here == "commands" and there == "commands" and target != module:
                # A re-export for users' own config files is the one exception: config.py.
                if module != f"{root.name}.config":
                    problems.append(f"{where}:{line}: the command imports the command {target}")
                continue
            if here not in rank or there not in rank:
                problems.append(f"{where}:{line}: {here} or {there} has no tier in TIERS")
            elif rank[there] < rank[here]:
                problems.append(f"{where}:{line}: {here} imports {target}, a tier above it")
            elif rank[there] == rank[here] and here in INDEPENDENT:
                problems.append(f"{where}:{line}: {here} imports its sibling {target}")
        aliases = _aliases(tree, modules)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{where}:{node.lineno}: uses {node.value.id}.{node.attr}, "
                                "another module's private name")
    problems += [f"import cycle: {' → '.join(cycle)}" for cycle in _cycles(edges)]
    return list(dict.fromkeys(problems))  # A line per breach, not per imported name.


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [group + [group[0]] for group in groups]


def test_the_package_keeps_its_layers():
    problems = violations(PACKAGE)
    assert not problems, "\n".join(problems)


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / "distil_flax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "distil_flax"


@pytest.mark.parametrize("files,expected", [
    ({"model/a.py": "from distil_flax.model import b\n",
      "model/b.py": "from distil_flax.model import a\n"}, "import cycle: distil_flax.model.a"),
    ({"model/a.py": "def f():\n    from distil_flax.model import b\n", "model/b.py": ""},
     "imports distil_flax.model.b late"),
    ({"model/a.py": "import typing\n"
                    "if typing.TYPE_CHECKING:\n    from distil_flax.model import b\n",
      "model/b.py": ""}, "imports distil_flax.model.b late"),
    ({"model/a.py": "from distil_flax.model.b import _hidden\n", "model/b.py": "_hidden = 1\n"},
     "private _hidden"),
    ({"model/a.py": "from distil_flax.model import b\nb._hidden()\n", "model/b.py": ""},
     "uses b._hidden"),
    ({"model/a.py": "from distil_flax.training import loop\n", "training/loop.py": ""},
     "model imports distil_flax.training.loop, a tier above it"),
    ({"distill/a.py": "from distil_flax.downstream import b\n", "downstream/b.py": ""},
     "distill imports its sibling distil_flax.downstream.b"),
    ({"main.py": "from distil_flax import finetune\n", "finetune.py": ""},
     "the command imports the command distil_flax.finetune"),
])
def test_each_breach_is_caught(tmp_path, files, expected):
    root = _write(tmp_path, {"__init__.py": "", **{
        os.path.join(os.path.dirname(n), "__init__.py"): "" for n in files if "/" in n}, **files})
    assert any(expected in p for p in violations(root)), violations(root)


def test_optional_libraries_may_still_be_imported_late(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "model/__init__.py": "",
                             "model/a.py": "def f():\n    import torch\n    return torch\n"})
    assert violations(root) == []
