"""Writes docs/bad-inputs.md: every bad-input case with the message metajax gives.

Run: ``python -m tests.render_bad_inputs`` (from the repository root). The tests check that every
case raises its documented error and that every case has a row here.
"""

from __future__ import annotations

import importlib
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from tests import badinput  # noqa: E402

MODULES = ("tests.bad_inputs_api", "tests.bad_inputs_models_tasks", "tests.bad_inputs_data_cli",
           "tests.bad_inputs_methods", "tests.bad_inputs_parallel", "tests.bad_inputs_review",
           "tests.bad_inputs_review4", "tests.bad_inputs_review5")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "bad-inputs.md")


def all_cases() -> list:
  cases = []
  for name in MODULES:
    cases += importlib.import_module(name).CASES
  return cases


def short(message: str) -> str:
  """The part of a message a user reads: for run-time errors, the metajax line."""
  found = re.findall(r"SolverError: (.*)", message) or re.findall(r"^\S+: error: .*$", message,
                                                                    re.M)
  lines = message.strip().splitlines()
  text = found[-1] if found else lines[0] if lines else message
  text = text.replace("(throw=False returns the status in AdaptInfo.result instead of raising.)",
                      "").strip()
  text = re.sub(r"/tmp/[^\s:'\"]+/", "$TMP/", text)
  text = re.sub(r"/tmp/tmp\w+", "$TMP", text)  # a temporary directory named last
  text = re.sub(r" at 0x[0-9a-f]+>", ">", text)  # object addresses change every run
  text = text.replace(ROOT, "$REPO")
  text = text.replace("|", "\\|").replace("][", "]\\[")  # x[0][1] is not a markdown link
  return text if len(text) <= 260 else text[:257] + "..."


def main() -> None:
  cases = all_cases()
  lines = [
      "# Bad inputs and the errors they get",
      "",
      "Every row is a test (`tests/test_bad_inputs*.py`): the input is tried and the error must "
      "match. Run-time failures inside `jit` reach you as `jax.errors.JaxRuntimeError` whose text "
      "ends with the metajax message shown here; set `throw=False` on a solver to get the status "
      "in `AdaptInfo.result` instead. Regenerate with `python -m tests.render_bad_inputs`.",
      "",
      f"{len(cases)} kinds of bad input.",
      "",
      "| area | bad input | error | message |",
      "|---|---|---|---|",
  ]
  for case in cases:
    try:
      message = badinput.message_of(case)
      kind = "run time (under jit)" if "SolverError" in message else "raised"
    except AssertionError as err:
      message, kind = str(err), "MISSING"
    lines.append(f"| {case.area} | {case.input} | {kind} | {short(message)} |")
  with open(OUT, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
  main()
