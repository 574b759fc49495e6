"""Build the tutorial notebooks from the cell sources below and execute them in place.

Run `python notebooks/build.py [name ...]` after changing a notebook's cells: the `.ipynb` files are
committed with their outputs so they read well without running. `tests/test_notebooks.py` executes
the committed notebooks in a fresh kernel, so CI fails when one breaks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for kind, source in cells:
        source = source.strip("\n")
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source))
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    return nb


def build(name: str) -> None:
    module = __import__(f"cells_{name}")
    nb = execute(notebook(module.CELLS))
    nbformat.write(nb, HERE / f"{name}.ipynb")
    print(f"wrote {name}.ipynb")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    names = sys.argv[1:] or sorted(p.stem[len("cells_") :] for p in HERE.glob("cells_*.py"))
    for name in names:
        build(name)
