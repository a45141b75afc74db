"""The package's import graph, read with `ast` (imports inside functions count): jaxrl.config imports no jaxrl
module but its leaf modules, and no import cycle runs through jaxrl's modules but the known ones listed
here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrl"

# Cycles not broken yet, each the set of modules of one strongly connected component. Break one, then delete
# it here (the test fails until then, so the list stays true).
KNOWN_CYCLES: list[set[str]] = []
# Modules split off jaxrl.config: each imports no jaxrl module at all.
CONFIG_LEAVES = {"jaxrl.config_ranges"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The jaxrl module an imported dotted name lives in (`jaxrl.synthetic.DATASETS` -> `jaxrl.synthetic`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The jaxrl modules `module` imports anywhere in its file: at the top, in functions, under conditions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_resolve(alias.name) for alias in node.names if alias.name.split(".")[0] == "jaxrl"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "jaxrl":
                # `from jaxrl.rl import advantages` imports a module; `from jaxrl.config import Config`, a
                # name.
                found |= {_resolve(f"{source}.{alias.name}") for alias in node.names}
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    return {module: imports_of(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_counts_imports_inside_functions():
    graph = import_graph()
    assert "jaxrl.rl.runner" in graph["jaxrl.train"]  # imported inside train.run
    assert "jaxrl.synthetic" in graph["jaxrl.data.pipeline"]  # `from jaxrl.synthetic import` in a function
    assert "jaxrl.rl.advantages" in graph["jaxrl.validate"]  # `from jaxrl.rl import advantages`: the module


def test_config_imports_no_jaxrl_module_but_its_leaves():
    assert imports_of("jaxrl.config") <= CONFIG_LEAVES
    for leaf in CONFIG_LEAVES:
        assert imports_of(leaf) == set(), leaf


def test_no_import_cycle_but_the_known_ones():
    found = sorted(sorted(c) for c in cycles(import_graph()))
    assert found == sorted(sorted(c) for c in KNOWN_CYCLES), f"import cycles: {found}"


# "About 500 lines": a module reads in one sitting (config, steps and sampling sit just over 500 today).
MAX_MODULE_LINES = 530


def test_every_module_reads_in_one_sitting():
    sizes = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50  # the walk found the package
    too_long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them along their seams): {too_long}"
