"""Nothing in the repository points at files or trackers that are not in it: no "issue N" of a
tracker users cannot see, no design notes or reviews kept elsewhere, and every relative link in
the markdown files and notebooks resolves to a file of the repository."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = re.compile(r"\bissue #?\d+|DESIGN\.md|\bReview A\.\d|\.\./shared|review-2026", re.I)
TEXT = (".py", ".md", ".ipynb", ".toml", ".cfg", ".txt", ".yml", ".yaml")


def _tracked():
  out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
  return [p for p in out.stdout.splitlines() if p.endswith(TEXT) and os.path.exists(
      os.path.join(ROOT, p))]


def test_no_reference_to_trackers_or_notes_outside_the_repository():
  here = os.path.relpath(__file__, ROOT)
  hits = []
  for path in _tracked():
    if path == here:
      continue
    text = open(os.path.join(ROOT, path), encoding="utf-8", errors="replace").read()
    hits += [f"{path}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
  assert not hits, hits


def test_every_relative_markdown_link_resolves():
  broken, checked = [], 0
  for path in _tracked():
    if not path.endswith((".md", ".ipynb")):
      continue
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+://|#|mailto:", target):
        continue
      file = target.split("#")[0]
      checked += bool(file)
      if file and not os.path.exists(os.path.join(ROOT, os.path.dirname(path), file)):
        broken.append(f"{path} -> {target}")
  assert not broken, broken
  assert checked >= 10  # the README and docs link their results and guides
