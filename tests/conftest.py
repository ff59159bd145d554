"""Test setup: 4 fake CPU devices, float64 available (float32 stays float32), fast compiles."""

import os

# Test programs are small and mostly run once, so compiling dominates the suite: LLVM's
# expensive passes off and -O0 take ~14% off it. XLA's HLO passes (fusion, layout, buffer
# assignment) and its floating-point semantics are the same; long runs use `release_env`.
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4 " + FAST_COMPILE).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def experiment_env(tmp_path_factory):
  """Environment for experiment scripts run as subprocesses.

  They share one persistent XLA compilation cache, so a program one run compiled (the same
  script resumed, the same evaluation) is loaded, not compiled again, by the next.
  """
  return {**os.environ,
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="session")
def release_env(experiment_env):
  """``experiment_env`` with XLA's normal optimization, for a script that runs long (the
  README's main job: 70,000 meta-iterations)."""
  flags = experiment_env["XLA_FLAGS"].replace(FAST_COMPILE, "").strip()
  return {**experiment_env, "XLA_FLAGS": flags}
