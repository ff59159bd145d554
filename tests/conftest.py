"""Test setup: 4 fake CPU devices and float64 available (float32 arrays stay float32)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()

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
