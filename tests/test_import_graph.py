"""The import graph of diti_fast, diti_fast.kernels (kernels/) and data_shards: no cycles, and no
module imports from a floor above its own.

Every ``import`` / ``from ... import`` is read with ``ast`` (module top and inside functions alike, so
a lazy import is an arrow too). Floors, bottom to top: the Triton kernels; the core (configuration
types, diffusion schedule, masks, objectives, networks, weight files); the data pipeline; the
training engine; the tools built on everything (evaluation, claim, reference checks, CLI, demo).
Run as a script it prints the counts.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> package name it is imported as (pyproject.toml's package-dir).
PACKAGES = {"diti_fast": "diti_fast", "kernels": "diti_fast.kernels", "data_shards": "data_shards"}

# Module-name prefix -> floor; the longest matching prefix wins. A module may import from its own
# floor or any below it.
FLOORS = {
    "diti_fast.kernels": 0,
    "diti_fast": 1,                    # package root, config, diffusion, masks, losses, nn, weights, ...
    "diti_fast.data": 2,
    "data_shards": 2,
    "diti_fast.engine": 3,
    "diti_fast.train": 3,
    "diti_fast.eval": 4,
    "diti_fast.claim": 4,
    "diti_fast.reference": 4,
    "diti_fast.import_original": 4,
    "diti_fast.selfcheck": 4,
    "diti_fast.demo": 4,
    "diti_fast.cli": 4,
}


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module top) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top = {id(n) for n in tree.body}
    for n in tree.body:  # statements under a module-level if/try are still module-top imports
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` names a submodule when there is one, else an attribute of pkg.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            if t.startswith("kernels.") or t == "kernels":
                t = "diti_fast." + t
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.append((t, node.lineno, id(node) in top))
    return found


def graph() -> dict[str, dict[str, tuple[int, bool]]]:
    mods = modules()
    known = set(mods)
    g: dict[str, dict[str, tuple[int, bool]]] = {m: {} for m in mods}
    for m, p in mods.items():
        for t, line, at_top in imports(m, p, known):
            # A package's __init__ is run by importing any of its submodules; that arrow (child ->
            # parent package) is implicit and not counted.
            if m.startswith(t + "."):
                continue
            g[m].setdefault(t, (line, at_top))
    return g


def cycles(g) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward(g) -> list[str]:
    return [f"{m} (floor {floor(m)}) -> {t} (floor {floor(t)}), line {line}"
            for m, ts in sorted(g.items()) for t, (line, _) in sorted(ts.items()) if floor(t) > floor(m)]


def test_every_module_has_a_floor_and_parses():
    g = graph()
    assert len(g) > 50 and "diti_fast.kernels.fused_loss" in g and "data_shards.synthetic" in g


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_import_runs_up_a_floor():
    assert upward(graph()) == []


def test_the_checker_sees_a_cycle_and_an_upward_arrow():
    # The checks themselves on a known graph: a -> b -> a is a cycle; core -> engine runs upward.
    g = {"diti_fast.a": {"diti_fast.b": (1, True)}, "diti_fast.b": {"diti_fast.a": (2, False)},
         "diti_fast.losses": {"diti_fast.engine.loop": (3, False)}, "diti_fast.engine.loop": {}}
    assert cycles(g) == [["diti_fast.a", "diti_fast.b"]]
    assert upward(g) == ["diti_fast.losses (floor 1) -> diti_fast.engine.loop (floor 3), line 3"]


if __name__ == "__main__":
    g = graph()
    arrows = sum(len(v) for v in g.values())
    local = sum(1 for v in g.values() for _, top in v.values() if not top)
    cyc, up = cycles(g), upward(g)
    print(f"{len(g)} modules, {arrows} project import arrows ({local} only inside functions)")
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  ", " <-> ".join(c))
    print(f"imports that run up a floor: {len(up)}")
    for u in up:
        print("  ", u)
