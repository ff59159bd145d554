"""Every bad input in the table gets a clear error (tests/badinput.py); the docs list them all."""

import os
import re

import pytest

from tests import bad_inputs_api, badinput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = bad_inputs_api.CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case):
  message = badinput.message_of(case)
  assert re.search(case.match, message, re.S), message


def test_cases_are_distinct():
  ids = [c.id for c in CASES]
  assert len(ids) == len(set(ids))
