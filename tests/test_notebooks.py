"""The tutorials: jupytext percent sources `notebooks/*.py`, each paired with its executed `.ipynb`.

Each source runs top to bottom in a fresh kernel, and the committed notebook has the source's cells
(so the two cannot drift) and its outputs. Rebuild as notebooks/README.md says:
`jupytext --update --to ipynb notebooks/0*.py && jupyter execute --inplace notebooks/0*.ipynb`.
"""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

HERE = Path(__file__).parent.parent / "notebooks"
SOURCES = sorted(HERE.glob("[0-9]*.py"))
REBUILD = (
    "rebuild it: jupytext --update --to ipynb notebooks/{0}.py && "
    "jupyter execute --inplace notebooks/{0}.ipynb"
)


def cells(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_runs_in_a_fresh_kernel(source):
    nb = jupytext.read(source)
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_notebook_matches_its_source_and_has_outputs(source):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: " + REBUILD.format(source.stem)
    text = jupytext.read(source)
    assert text.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", (
        f"{source.name} has no jupytext header pairing it with {paired.name}"
    )
    committed = nbformat.read(paired, as_version=4)
    assert cells(committed) == cells(text), (
        f"{paired.name} differs from {source.name}: " + REBUILD.format(source.stem)
    )
    code = [c for c in committed.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.outputs for c in code[1:]), (
        f"{paired.name} is committed without outputs: " + REBUILD.format(source.stem)
    )
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{paired.name} was not executed top to bottom: " + REBUILD.format(source.stem)
    )


def test_every_notebook_has_a_source():
    notebooks = sorted(p.stem for p in HERE.glob("*.ipynb"))
    assert len(SOURCES) >= 3 and notebooks == [p.stem for p in SOURCES]
