"""The snippets of docs/methods.md run as written, in order, in one namespace."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_methods_guide_snippets_run():
  text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 6
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/methods.md[python block {i}]", "exec"), namespace)  # noqa: S102
