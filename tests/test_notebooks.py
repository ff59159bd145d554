"""Every notebook in docs/notebooks executes top to bottom in its fast mode (its cells assert
their own results), and the stored copies the docs site renders were executed and hold no errors."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")  # in the [test] extra: never skipped in CI
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "docs", "notebooks", "*.ipynb")))
REQUIRED = {"quickstart", "three_solvers", "your_own_model", "fewshot_digits",
            "learned_hyperparameters", "scaling"}


def code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_tutorial_notebooks_are_present():
  names = {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}
  assert REQUIRED <= names, f"missing: {sorted(REQUIRED - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_notebook_was_executed_and_has_no_errors(path):
  notebook = nbformat.read(path, as_version=4)
  cells = code_cells(notebook)
  assert all(cell.execution_count for cell in cells), "a code cell was never run"
  assert any(cell.outputs for cell in cells), "no stored outputs"
  errors = [o for cell in cells for o in cell.outputs if o.output_type == "error"]
  assert not errors, f"stored error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_in_fast_mode(path, monkeypatch):
  monkeypatch.setenv("METAJAX_NOTEBOOK_FAST", "1")  # the kernel inherits the environment
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  errors = [o for cell in code_cells(notebook) for o in cell.outputs if o.output_type == "error"]
  assert not errors
  assert any(o.get("name") == "stdout" for cell in code_cells(notebook) for o in cell.outputs)
