"""The shape of the code, held: the package's import graph flows one way (no circles, function-level imports
included), and what an engine is lives in its module (no engine-name comparison outside greentext_dist/engines/)."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "greentext_dist"


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (top level or in a function), but not under
    `if TYPE_CHECKING:` (annotations only, never run)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("greentext_dist"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("greentext_dist")}
    return found & known


def test_the_import_graph_has_no_circles():
    mods = modules()
    graph = {m: runtime_imports(p, set(mods)) - {m} for m, p in mods.items()}
    state, circles = {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_engine_name_is_compared_outside_the_engines():
    """Adding an engine is one module and one registry line: nothing else may branch on an engine's name."""
    from greentext_dist.engines import NAMES

    names = set(NAMES) | {f"{n}_offload" for n in NAMES}
    found = []
    for m, p in modules().items():
        if m.startswith("greentext_dist.engines"):
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            consts = []
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts if isinstance(e, ast.Constant)]
            elif isinstance(node, ast.Dict):
                consts = [k for k in node.keys if isinstance(k, ast.Constant)]
            found += [f"{p.relative_to(ROOT)}:{c.lineno} {c.value!r}" for c in consts if c.value in names]
    assert not found, "engine knowledge outside greentext_dist/engines/ (ask the registry, ENGINES[name]):\n" + "\n".join(found)
