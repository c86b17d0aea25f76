"""The direction of imports is a rule: cli -> runtime commands / convert -> runtime.model -> runtime.store,
runtime.cpu -> layouts, quant; no cycles anywhere; the store never imports model code; layouts imports
nothing else of moestream. Read from the source with ``ast`` (imports inside functions count too,
``if TYPE_CHECKING:`` blocks do not), so nothing is imported to check it. docs/architecture.md states
the same rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "cli": "moestream",
    "convert": "moestream.convert",
    "quant": "moestream.quant",
    "runtime": "moestream.runtime",
    "metal": "moestream.metal",
    "layouts": "moestream.layouts",
}

# What each part may import (besides itself and the namespace root ``moestream``, which holds
# ``__version__`` only). The first matching prefix decides.
L, Q, M = "moestream.layouts", "moestream.quant", "moestream.metal"
OPT, AN = "moestream.runtime.options", "moestream.runtime.analysis"
CPU, STORE, MODEL = "moestream.runtime.cpu", "moestream.runtime.store", "moestream.runtime.model"
ALLOWED = [
    (L, {L}),
    (Q, {L, Q}),
    (M, {L, Q, M}),
    (OPT, {L, OPT}),
    (AN, {L, AN}),
    (CPU, {L, Q, CPU}),
    (STORE, {L, Q, OPT, STORE}),
    (MODEL, {L, Q, M, OPT, AN, CPU, STORE, MODEL}),
    ("moestream.runtime.serve", {L, Q, M, OPT, AN, CPU, STORE, MODEL, "moestream.runtime.serve"}),
    ("moestream.convert", {L, Q, "moestream.convert"}),
    # the commands (generate, evaluate, bench, collect_calibration) and the runtime's namespace
    ("moestream.runtime", {L, Q, M, "moestream.runtime", "moestream.convert"}),
    ("moestream", {"moestream"}),  # the CLI: anything
]


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for p in (ROOT / folder).rglob("*.py"):
            parts = list(p.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = (p, is_pkg)
    return out


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _imports(name: str, path: Path, is_pkg: bool, modules: dict) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    base = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("moestream"):
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    out.add(full if full in modules else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("moestream"))
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    g = {n: _imports(n, p, pkg, modules) for n, (p, pkg) in modules.items()}
    unknown = {(n, m) for n, deps in g.items() for m in deps if m not in modules}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"
    return g


def _inside(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def test_imports_run_one_way(graph):
    bad = []
    for mod, deps in graph.items():
        rule = next(allowed for prefix, allowed in ALLOWED if _inside(mod, prefix))
        for dep in deps:
            if dep != "moestream" and not any(_inside(dep, a) for a in rule):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the rule (docs/architecture.md):\n" + "\n".join(sorted(bad))


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_rule_catches_a_wrong_import(graph):
    """The check itself: a store module importing model code, or layouts importing quant, is flagged."""
    fake = {**graph, "moestream.runtime.store.slabs": graph["moestream.runtime.store.slabs"] | {MODEL + ".blocks"}}
    with pytest.raises(AssertionError, match="store.slabs -> moestream.runtime.model.blocks"):
        test_imports_run_one_way(fake)
    fake = {**graph, "moestream.layouts.pack": graph["moestream.layouts.pack"] | {"moestream.quant.affine"}}
    with pytest.raises(AssertionError, match="layouts.pack -> moestream.quant.affine"):
        test_imports_run_one_way(fake)
    fake = {**graph, "moestream.layouts.errors": {"moestream.layouts.pack"}}
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles(fake)
