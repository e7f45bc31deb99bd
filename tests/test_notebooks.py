"""The notebooks execute top to bottom on CPU (nbclient, the python3 kernel, the repository root as working
directory), and are committed with the outputs of such a run, so that a reader browsing them sees what they print
and plot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["offline_generation.ipynb", "kernels.ipynb", "scheduling_research.ipynb"]
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_the_outputs_of_a_whole_run(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"notebooks/{name}: execution counts {counts}: commit it as one run top to bottom "
        f"(jupyter nbconvert --to notebook --execute --inplace notebooks/{name})")
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any(c.outputs for c in code), f"notebooks/{name} shows no output at all"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel process inherits the environment
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "some cells did not run"
