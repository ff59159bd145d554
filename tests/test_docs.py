"""The documentation site: every guide's snippets run, the site builds with warnings as errors,
and the API reference covers every public symbol, each with a docstring (functions: an example,
which --doctest-modules runs)."""

import importlib
import inspect
import os
import re
import subprocess
import sys

import jax
import pytest

import metajax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PUBLIC_MODULES = ["metajax.solvers", "metajax.solvers.inner_optimizers",
                  "metajax.solvers.linear_solvers", "metajax.meta", "metajax.tasks",
                  "metajax.models", "metajax.data", "metajax.parallel"]
GUIDES = sorted(os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(DOCS)
                for f in files if f.endswith(".md"))


def public_api():
  """``(module, name, object)`` for every name in the public modules' ``__all__``."""
  out = []
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} has no __all__"
    for name in module.__all__:
      obj = getattr(module, name)
      if not inspect.ismodule(obj):
        out.append((module_name, name, obj))
  return out


def python_blocks(path):
  text = open(os.path.join(ROOT, path), encoding="utf-8").read()
  return re.findall(r"```python\n(.*?)```", text, re.S)


def test_every_top_level_subpackage_is_documented():
  assert {m.split(".")[1] for m in PUBLIC_MODULES} == set(metajax.__all__)


@pytest.mark.parametrize("path", [p for p in GUIDES if python_blocks(p)])
def test_guide_snippets_run(path):
  """The python blocks of each page run as written, in order, in one namespace."""
  namespace: dict = {}
  x64 = jax.config.jax_enable_x64  # the suite runs in float64; a reader starts in float32
  jax.config.update("jax_enable_x64", False)
  try:
    for i, block in enumerate(python_blocks(path)):
      exec(compile(block, f"{path}[python block {i}]", "exec"), namespace)  # noqa: S102
  finally:
    jax.config.update("jax_enable_x64", x64)


def test_every_guide_is_in_the_site_navigation():
  nav = open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8").read()
  for path in GUIDES:
    assert os.path.relpath(path, "docs") in nav, f"{path} is not in mkdocs.yml's nav"


def test_public_functions_have_runnable_examples_and_classes_have_docstrings():
  missing_doc, missing_example = [], []
  for module, name, obj in public_api():
    defined_here = getattr(obj, "__module__", "").startswith("metajax")
    if not ((inspect.isfunction(obj) or inspect.isclass(obj)) and defined_here):
      continue  # constants (NORM_MODES, MAML_KERNEL_INIT, ...) are described in their module
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
      missing_doc.append(f"{module}.{name}")
    elif inspect.isfunction(obj) and ">>>" not in doc:
      missing_example.append(f"{module}.{name}")
  assert not missing_doc, f"no docstring: {missing_doc}"
  assert not missing_example, f"no runnable example: {missing_example}"


def test_no_sentinel_objects_in_public_signatures():
  for module, name, obj in public_api():
    if inspect.isfunction(obj):
      assert "object at 0x" not in str(inspect.signature(obj)), f"{module}.{name}"


def test_troubleshooting_explains_every_result_status():
  text = open(os.path.join(DOCS, "guides", "troubleshooting.md"), encoding="utf-8").read()
  for status in metajax.solvers.RESULTS:
    assert f"### `{status.name}`" in text, f"no troubleshooting entry for {status.name}"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
  pytest.importorskip("mkdocs")  # in the [test] extra: never skipped in CI
  site = tmp_path_factory.mktemp("site")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(site)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
  return site


def test_site_builds_with_warnings_as_errors(built_site):
  assert (built_site / "index.html").exists()
  for name in ("quickstart", "three_solvers", "your_own_model", "fewshot_digits",
               "learned_hyperparameters", "scaling"):
    page = (built_site / "notebooks" / name / "index.html").read_text(encoding="utf-8")
    assert "data:image/png;base64" in page or name == "scaling", f"{name}: no rendered plot"


def test_api_reference_covers_every_public_symbol(built_site):
  html = "".join(p.read_text(encoding="utf-8") for p in (built_site / "api").rglob("*.html"))
  missing = [f"{module}.{name}" for module, name, _ in public_api()
             if f'id="{module}.{name}"' not in html]
  assert not missing, f"not in the API reference: {missing}"
