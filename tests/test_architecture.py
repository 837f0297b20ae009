"""The package's shape, read with ast (no import, no TensorFlow): imports go one way, the core
never names a task, every module says what it owns, and long functions say why they are long.

Layers, lowest first. A module may import its own layer and those below it, never one above:
a new task or driver that needs something from above has put it in the wrong place.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tfkarpa"

# (layer name, module prefixes). The first matching prefix decides a module's layer.
LAYERS = [
    ("base", ["tfkarpa.errors", "tfkarpa.kcv", "tfkarpa.config"]),
    ("records", ["tfkarpa.runs", "tfkarpa.board", "tfkarpa.optimizers", "tfkarpa.distribute"]),
    ("data and models", ["tfkarpa.data", "tfkarpa.models", "tfkarpa.optimize"]),
    ("core", ["tfkarpa.core"]),
    # Tasks build on each other's runs in one direction: pretrain <- classify <- detect.
    ("task pretrain", ["tfkarpa.tasks.pretrain"]),
    ("task classify", ["tfkarpa.tasks.classify"]),
    ("task detect", ["tfkarpa.tasks.detect"]),
    ("task registry", ["tfkarpa.tasks"]),  # tasks/__init__.py: TASKS and the dispatching calls
    ("drivers", ["tfkarpa.tasks.demo", "tfkarpa.tasks.search", "tfkarpa.tasks.search_space",
                 "tfkarpa.tasks.search_report", "tfkarpa.tasks.federate"]),
]
LONG = 60  # lines; a longer function needs a comment right above it saying why


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    if name == "tfkarpa":
        return 0  # the package's __init__: selects Keras 2, imports errors only
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{name} is in no layer of tests/test_architecture.py: add it"
    return best[0]


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert _cycles() == []


def test_nothing_outside_the_tasks_imports_a_task():
    leaks = [(a, b) for a, targets in GRAPH.items() for b in targets
             if b.startswith("tfkarpa.tasks") and not a.startswith("tfkarpa.tasks")]
    assert leaks == []


def test_no_module_imports_one_above_it():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in GRAPH.items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


def test_the_core_names_no_task():
    """Task knowledge lives in the tasks: the core holds no task name in its code."""
    names = {"classify", "detect", "pretrain"}
    found = []
    for name, path in MODULES.items():
        if not name.startswith("tfkarpa.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert found == []


def test_every_task_is_registered_and_answers_the_interface():
    """Every package under tasks/ but the drivers' is in TASKS under its own name, with its own
    headline figure. (Reads the registry's source: importing it would load TensorFlow.)"""
    drivers = {prefix.rsplit(".", 1)[1] for prefix in dict(LAYERS)["drivers"]}
    packages = {p.name for p in (PACKAGE / "tasks").iterdir()
                if (p / "__init__.py").is_file() and p.name not in drivers}
    registry = ast.parse((PACKAGE / "tasks" / "__init__.py").read_text())
    tasks = next(n.value for n in ast.walk(registry) if isinstance(n, ast.AnnAssign)
                 and getattr(n.target, "id", "") == "TASKS")
    assert {k.value for k in tasks.keys} == packages
    for package in packages:
        source = (PACKAGE / "tasks" / package / "task.py").read_text()
        assert f'name = "{package}"' in source and "key_metric = " in source


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_owns(name):
    assert ast.get_docstring(ast.parse(MODULES[name].read_text())), f"{name} has no docstring"


def test_long_functions_say_why():
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.end_lineno - node.lineno + 1 <= LONG:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = lines[first - 2].strip() if first >= 2 else ""
            if not above.startswith("#"):
                unexplained.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} "
                                   "lines)")
    assert unexplained == []
