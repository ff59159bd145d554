"""MAML next to ANIL, BOIL, MAML++, CAVIA, ML3-style learned losses and MLTI, one budget each.

Runs ``experiments/sinusoid.py`` and ``experiments/fewshot.py`` (digits, 5-way 1- and 5-shot) once
per method with the same meta-iterations, meta-batch and inner steps, and writes
``experiments/results/methods.{json,md}``: query MSE (sinusoid, 5-shot, after 1/5/10 steps) or
accuracy (digits), each with its 95% confidence interval over the test tasks, and the training
time. The methods are built in ``experiments/recipes.py``.

Run: ``python experiments/compare_methods.py`` (about 40 minutes on 2 CPU cores);
``--only sinusoid`` or ``--only digits`` runs one half, ``--sinusoid-iterations`` and
``--digits-iterations`` change the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root holds experiments/
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common, fewshot, sinusoid  # noqa: E402

ROWS = (("maml", None), ("anil", None), ("boil", None), ("mamlpp", None), ("cavia", None),
        ("ml3", None), ("maml", 0.5))  # (solver, MLTI alpha)
SINUSOID_FLAGS = ("--inner-steps", "5", "--inner-lr", "0.01", "--chunk", "1000")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def label(solver: str, mlti) -> str:
  names = {"maml": "MAML", "anil": "ANIL", "boil": "BOIL", "mamlpp": "MAML++",
           "cavia": "CAVIA", "ml3": "ML3 (learned loss)"}
  return names[solver] + (f" + MLTI (alpha {mlti})" if mlti is not None else "")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                              description=__doc__.splitlines()[0])
  p.add_argument("--only", choices=("sinusoid", "digits"), default=None)
  p.add_argument("--sinusoid-iterations", type=int, default=20_000)
  p.add_argument("--digits-iterations", type=int, default=1000)
  p.add_argument("--eval-tasks", type=int, default=600)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--runs", default="runs/methods", help="where each run writes its outputs")
  p.add_argument("--results", default=RESULTS, help="where methods.{json,md} go")
  args = p.parse_args(argv)
  common.check_flags(p, args, positive_int=("--sinusoid-iterations", "--digits-iterations"),
                     int_range={"--eval-tasks": (2, None), "--seed": common.SEED_RANGE})
  return args


def _run(script, flags: list[str], out: str) -> dict:
  """``script.main(flags + --out out)``, or the ``results.json`` an earlier run left in ``out``
  (an interrupted comparison resumes where it stopped; delete ``--runs`` to rerun), refused
  when that run was made with other flags; a run that raises is recorded with its error
  instead of stopping the comparison."""
  path, flags_path = os.path.join(out, "results.json"), os.path.join(out, "compare_flags.json")
  if os.path.exists(path):
    saved = None
    if os.path.exists(flags_path):
      with open(flags_path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved != flags:
      raise SystemExit(
          f"compare_methods.py: error: {out} holds a finished run made with other flags "
          f"({' '.join(saved) if saved else 'not recorded'}; now {' '.join(flags)}): its results "
          "would be reported under this comparison's flags. Delete it or pass another --runs.")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  with open(flags_path, "w", encoding="utf-8") as f:  # before the run: no window without it
    json.dump(flags, f)
  try:
    return script.main([*flags, "--out", out])
  except Exception as err:  # a loud solver failure: keep it in the table  # noqa: BLE001
    return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}


def _without(flags: tuple[str, ...], flag: str) -> tuple[str, ...]:
  """``flags`` without ``flag`` and its value (CAVIA adapts with --context-lr, not --inner-lr)."""
  at = flags.index(flag)
  return flags[:at] + flags[at + 2:]


def run_flags(solver: str, mlti, args, shots: int | None = None) -> list[str]:
  """The flags of one run: sinusoid.py's when ``shots`` is None, else fewshot.py's."""
  flags = ["--solver", solver, "--seed", str(args.seed), "--eval-tasks", str(args.eval_tasks)]
  flags += ["--mlti", str(mlti)] if mlti is not None else []
  if shots is not None:
    return [*flags, "--shots", str(shots), "--iterations", str(args.digits_iterations)]
  sinusoid_flags = (SINUSOID_FLAGS if solver != "cavia"
                    else _without(SINUSOID_FLAGS, "--inner-lr"))
  return [*flags, *sinusoid_flags, "--iterations", str(args.sinusoid_iterations)]


def run_all(args) -> list[dict]:
  records = []
  for solver, mlti in ROWS:
    name = solver + ("-mlti" if mlti is not None else "")
    if args.only in (None, "sinusoid"):
      result = _run(sinusoid, run_flags(solver, mlti, args),
                    os.path.join(args.runs, f"sinusoid-{name}"))
      records.append({"benchmark": "sinusoid", "method": label(solver, mlti), **result})
    if args.only in (None, "digits"):
      for shots in (1, 5):
        result = _run(fewshot, run_flags(solver, mlti, args, shots),
                      os.path.join(args.runs, f"digits-{name}-{shots}shot"))
        records.append({"benchmark": f"digits-{shots}shot", "method": label(solver, mlti),
                        **result})
  return records


def markdown(records: list[dict], args) -> str:
  env = common.environment()
  lines = ["# MAML and the methods built on its contract, one budget each", "",
           f"Generated by `python experiments/compare_methods.py` (seed {args.seed}); "
           f"{env['backend']} ({env['device']}, {env['cpus']} cores), jax {env['jax']}, "
           f"python {env['python']}. 95% confidence intervals over {args.eval_tasks} test tasks.",
           ""]
  sin = [r for r in records if r["benchmark"] == "sinusoid"]
  if sin:
    lines += [f"## Sinusoid (MAML's protocol, {args.sinusoid_iterations} meta-iterations, 5 inner "
              "steps of 0.01 in training; CAVIA: 4 context inputs, step 1.0)", "",
              "5-shot query MSE after k fine-tuning steps (lower is better).", "",
              "| method | 1 step | 5 steps | 10 steps | train time |", "|---|---|---|---|---|"]
    for r in sin:
      if "error" in r:
        lines.append(f"| {r['method']} | failed: {r['error']} | | | |")
        continue
      cells = [f"{row['mse']:.3f} ± {row['ci95']:.3f}" for row in r["rows"]]
      lines.append(f"| {r['method']} | " + " | ".join(cells)
                   + f" | {r['train_seconds']:.0f} s |")
    lines.append("")
  for shots in (1, 5):
    rows = [r for r in records if r["benchmark"] == f"digits-{shots}shot"]
    if not rows:
      continue
    lines += [f"## Digits, 5-way {shots}-shot ({args.digits_iterations} meta-iterations, "
              "1 inner step of 0.4 in training, 3 at test; MAML++: 3 steps both; CAVIA: a "
              "context of 100 through FiLM, step 1.0)", "",
              "| method | accuracy | train time |", "|---|---|---|"]
    lines += [f"| {r['method']} | failed: {r['error']} | |" if "error" in r else
              f"| {r['method']} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}% | "
              f"{r['train_seconds']:.0f} s |" for r in rows]
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  records = run_all(args)
  os.makedirs(args.results, exist_ok=True)
  suffix = "" if args.only is None else f"-{args.only}"
  with open(os.path.join(args.results, f"methods{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump({"records": records, **common.environment()}, f, indent=1)
  text = markdown(records, args)
  with open(os.path.join(args.results, f"methods{suffix}.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text)
  return records


if __name__ == "__main__":
  main()
