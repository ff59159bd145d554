"""One format for the bad-input table: every row is a test and a line of docs/bad-inputs.md.

A :class:`Case` says what was wrong (in a user's words), how to provoke it, and what metajax
must answer: an exception type and a regular expression its message must match. The message must
name the argument (or flag, or file) and what was wrong with it; a case never accepts a silent
result. ``tests/test_bad_inputs.py`` runs every case; ``python -m tests.render_bad_inputs``
writes the docs table with the real messages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Case:
  area: str  # "solvers", "meta", "tasks", "models", "data", "cli", "checkpoints", "parallel"
  input: str  # what was wrong, as a user would describe it
  call: Callable[[], Any]  # must raise
  error: type | tuple  # the exception type(s) accepted
  match: str  # regular expression searched in the message

  @property
  def id(self) -> str:
    return f"{self.area}: {self.input}"


def message_of(case: Case) -> str:
  """Runs ``case.call`` and returns the message of the exception it raises (fails otherwise)."""
  try:
    result = case.call()
    try:  # errors raised at run time inside jit surface when the value is read
      import jax
      jax.block_until_ready(result)
    except TypeError:
      pass
  except case.error as err:
    return str(err)
  raise AssertionError(f"{case.id}: no {case.error} raised (silent result)")
