"""The package layout holds: imports run one way down the stage packages, no module imports
another inside a function, there is no circle of imports, and no function takes more than
six parameters."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import samesheep

PACKAGE = Path(samesheep.__file__).parent
LAYERS = (
    *("core", "data", "lm", "sae"),
    *("features", "layers", "compare", "causal", "interpret", "report"),
    *("pipeline", "cli"),
)
"""From the bottom up: a module may import its own package and the ones before it only."""
TOP = ("__init__", "__main__")
"""The package's front door: it may import anything."""
HEAVY_OPTIONAL = ("transformers", "datasets", "gguf", "huggingface_hub")
"""Third-party packages a function may import where it needs them (slow to import, or
needed only by some model sources)."""
MAX_PARAMETERS = 6


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(p): (p, ast.parse(p.read_text(encoding="utf-8")))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def imported(node: ast.AST, name: str, is_package: bool) -> list[str]:
    """The samesheep modules (or packages) an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "samesheep"]
    if not isinstance(node, ast.ImportFrom):
        return []
    package = name if is_package else name.rpartition(".")[0]
    base = (
        importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if (node.level)
        else (node.module or "")
    )
    if base.split(".")[0] != "samesheep":
        return []
    out = []
    for alias in node.names:  # `from . import x` names a module where x is one
        sub = f"{base}.{alias.name}"
        known = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
            PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
        ).is_file()
        out.append(sub if known else base)
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(module: str) -> int:
    layer = layer_of(module)
    return len(LAYERS) if layer in TOP else LAYERS.index(layer)


def graph() -> dict[str, set[str]]:
    found = modules()
    edges: dict[str, set[str]] = {}
    for name, (path, tree) in found.items():
        is_package = path.name == "__init__.py"
        edges[name] = {
            m for node in ast.walk(tree) for m in imported(node, name, is_package) if m != name
        }
    return edges


def test_every_module_sits_in_a_known_package():
    for name in modules():
        assert layer_of(name) in LAYERS + TOP, f"{name} is outside the layout's packages"


def test_imports_run_one_way_down_the_packages():
    upward = []
    for name, targets in graph().items():
        for target in targets:
            same = layer_of(target) == layer_of(name)
            if not same and rank(target) >= rank(name):
                upward.append(f"{name} imports {target}")
    assert not upward, "imports against the layout:\n" + "\n".join(sorted(upward))


def test_no_module_imports_inside_a_function():
    hidden = []
    for path, tree in modules().values():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    top = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
                    names = [top] if top else [a.name for a in node.names]
                    if getattr(node, "level", 0) or any(
                        n.split(".")[0] not in HEAVY_OPTIONAL for n in names
                    ):
                        hidden.append(f"{path.relative_to(PACKAGE)}:{node.lineno} in {fn.name}")
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports (one per strongly connected set of modules), found by
    Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_there_is_no_circle_of_imports():
    edges = graph()
    # A package's __init__ re-exports its modules: the edge from a module to its own
    # package (importing the package runs __init__) is what Python resolves first, and
    # is no circle of the code's own dependencies.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    assert not cycles(edges)


def test_the_circle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_takes_more_than_six_parameters():
    long = []
    for _, (path, tree) in modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                a = fn.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                n = len([x for x in names if x not in ("self", "cls")])
                n += bool(a.vararg) + bool(a.kwarg)
                if n > MAX_PARAMETERS:
                    long.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} takes {n}")
    assert not long, "functions past six parameters:\n" + "\n".join(long)


def test_no_fmt_skip_markers():
    marker = "fmt" + ": skip"  # (spelled apart so this file does not hold it)
    roots = [PACKAGE, *(PACKAGE.parents[1] / d for d in ("tests", "benchmarks", "scripts"))]
    marked = [
        f"{p}:{i}"
        for root in roots
        for p in sorted(root.rglob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if marker in line
    ]
    assert not marked, "long lines kept by a formatter marker:\n" + "\n".join(marked)
