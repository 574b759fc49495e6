"""The package's structure: imports read top-down, no hidden channels, a small public face."""

import ast
import pathlib

import lrmult

PACKAGE = pathlib.Path(lrmult.__file__).parent


def _imports() -> dict[str, set[str]]:
    """`{module: lrmult modules it imports}`, lazy imports inside functions included."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            names = []
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("lrmult")
            ):
                if "." in node.module:
                    names = [node.module.split(".", 1)[1]]
                else:
                    names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [
                    a.name.split(".", 1)[1] for a in node.names if a.name.startswith("lrmult.")
                ]
            edges[m] |= {n.split(".")[0] for n in names if n.split(".")[0] in modules} - {m}
    return edges


def test_the_import_graph_has_no_cycle():
    edges = _imports()
    edges.pop("__init__")
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        assert m not in stack, f"import cycle: {' -> '.join([*stack[stack.index(m) :], m])}"
        if m in done:
            return
        for n in sorted(edges[m] - {"__init__"}):
            visit(n, [*stack, m])
        done.add(m)

    for m in sorted(edges):
        visit(m, [])


def test_imports_run_top_down():
    """parameter -> paramdict -> lookup -> binding -> transforms -> resync -> report ->
    optimizers -> plans -> trainer -> flax_interop; checkpoint, display, flax_trees, _names at
    the bottom."""
    order = [
        "_names",
        "_where",
        "display",
        "checkpoint",
        "flax_trees",
        "schedules",
        "parameter",
        "paramdict",
        "lookup",
        "binding",
        "transforms",
        "resync",
        "report",
        "optimizers",
        "plans",
        "trainer",
        "presets",
        "rules",
        "flax_interop",
    ]
    edges = _imports()
    assert set(order) == set(edges) - {"__init__"}, "a module is missing from the order"
    for m, deps in edges.items():
        if m == "__init__":
            continue
        for d in deps:
            assert order.index(d) < order.index(m), f"{m} imports {d}, which sits above it"


def test_no_context_variables_or_module_level_counters():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert "contextvars" not in path.read_text(), path.name
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Global), f"{path.name}: a `global` statement"


def test_init_only_reexports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    kinds = {type(node) for node in tree.body}
    assert kinds <= {ast.Expr, ast.Import, ast.ImportFrom, ast.Assign}
    assert sorted(lrmult.__all__) == lrmult.__all__
    for name in lrmult.__all__:
        assert hasattr(lrmult, name), name


def test_two_trainers_do_not_see_each_others_changes():
    """Changes are tracked per owner: a change on one model's Parameters leaves another
    Trainer's change log empty (no refresh, no regather)."""
    import jax.numpy as jnp

    a = lrmult.ParamDict.from_pytree({"w": jnp.ones(2)})
    b = lrmult.ParamDict.from_pytree({"v": jnp.ones(2)})
    ta, tb = lrmult.Trainer(a, "sgd"), lrmult.Trainer(b, "sgd")
    ta.step({"w": jnp.ones(2)})
    tb.step({"v": jnp.ones(2)})
    a["w"].lr_mult = 0.5
    a["w"].data()
    assert tb._log.metadata == set() and tb._log.values == set()
    assert ta._log.metadata == {"w"} and ta._log.values == {"w"}
