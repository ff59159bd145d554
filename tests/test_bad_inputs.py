"""Every bad input in the table gets a clear error (tests/badinput.py); the docs list them all.

The table: tests/bad_inputs_api.py (solvers, meta, parallel), tests/bad_inputs_models_tasks.py
(task families, models) and tests/bad_inputs_data_cli.py (data loaders, experiment flags,
checkpoints).
"""

import os
import re

import pytest

from tests import badinput, render_bad_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = render_bad_inputs.all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case):
  message = badinput.message_of(case)
  assert re.search(case.match, message, re.S), f"{case.id}:\n{message}"


def test_the_table_covers_every_area_with_distinct_inputs():
  ids = [c.id for c in CASES]
  assert len(ids) == len(set(ids)) and len(ids) >= 80
  counts = {area: sum(c.area == area for c in CASES) for area in
            ("solvers", "meta", "tasks", "models", "data", "cli", "checkpoints", "parallel")}
  assert all(n >= 2 for n in counts.values()), counts


def test_every_case_has_a_row_in_the_docs_table():
  table = open(os.path.join(ROOT, "docs", "bad-inputs.md"), encoding="utf-8").read()
  missing = [c.id for c in CASES if f"| {c.area} | {c.input} |" not in table]
  assert not missing, f"rerun python -m tests.render_bad_inputs; missing rows: {missing}"
  assert "| MISSING |" not in table
