"""Imports point one way (issue 19): read from the source with ``ast``, nothing imported or run.

The op implementations are leaves: the Triton kernels (``kernels/``, imported as
``invnext_kernels``) and the CUDA launchers (``invnext/native/``) import nothing of invnext but
the shared floor ``invnext.common``, which imports nothing of invnext but itself. The data package
knows no model, evaluation does not import the trainer (the trainer runs evaluation), and no group
of modules or subpackages imports each other. Imports inside functions count: a lazy import is
still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> import name
TREES = {"invnext": "invnext", "kernels": "invnext_kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in TREES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports, relative imports resolved, ``from pkg import sub`` as ``pkg.sub``."""
    path = MODULES[module]
    package = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([target] if target else []))
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            out |= subs or {target}
    return out


IMPORTS = {m: _imports(m) for m in MODULES}


def _ours(target: str) -> bool:
    return target == "invnext" or target.startswith("invnext.")


def _outside(modules_of, allowed: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{m} imports {t}"
        for m in MODULES
        if modules_of(m)
        for t in IMPORTS[m]
        if _ours(t) and not any(t == a or t.startswith(a + ".") for a in allowed)
    )


def _in(*prefixes: str):
    return lambda m: any(m == p or m.startswith(p + ".") for p in prefixes)


def test_kernels_and_native_import_only_the_shared_floor():
    assert _outside(_in("invnext_kernels"), ("invnext.common",)) == []
    assert _outside(_in("invnext.native"), ("invnext.common", "invnext.native")) == []
    assert _outside(_in("invnext.common"), ("invnext.common",)) == []


def test_data_knows_no_model_and_evaluation_no_trainer():
    assert _outside(_in("invnext.data"), ("invnext.data", "invnext.config", "invnext.common")) == []
    bad = [f"{m} imports {t}" for m in MODULES if _in("invnext.eval")(m) for t in IMPORTS[m] if _in("invnext.train")(t)]
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # A package's __init__ only gathers names; importing it is not a dependency on its modules.
    modules = {m: {t for t in IMPORTS[m] if t in MODULES and t not in PACKAGES and t != m} for m in MODULES}
    assert _cycles(modules) == []
    floor = lambda m: ".".join(m.split(".")[:2]) if m.startswith("invnext.") else m.split(".")[0]
    floors: dict[str, set[str]] = {}
    for m, targets in modules.items():
        floors.setdefault(floor(m), set()).update(floor(t) for t in targets if floor(t) != floor(m))
    for targets in list(floors.values()):
        for t in targets:
            floors.setdefault(t, set())
    assert _cycles(floors) == []
