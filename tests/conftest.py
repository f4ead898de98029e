"""Test set-up: 8 simulated CPU devices for every test (multi-device code is tested on CPU).

Must run before jax is imported anywhere, which is why it lives in the root conftest.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent JAX compilation cache per test process (per xdist worker), inherited by the CLI runs and
# worker processes the tests start: a test that runs the same stage several times (resume, damaged
# checkpoints, the workdir guard, 2 processes against 1) compiles each program once. A cached executable
# is the same program, so bitwise comparisons hold. Per worker, not shared: jax writes an entry in place
# (no rename), and a concurrent reader of a half-written entry would warn and recompile. Programs that
# compile in under 0.2 s are not worth the write. An explicitly set JAX_COMPILATION_CACHE_DIR is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or "_AFMRL_TEST_JAX_CACHE" in os.environ:
  import atexit
  import shutil
  import tempfile
  _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  if os.environ.get("_AFMRL_TEST_JAX_CACHE") != _worker:  # not yet set up in this process (or inherited)
    _cache = tempfile.mkdtemp(prefix=f"afmrl_jax_cache_{_worker}_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["_AFMRL_TEST_JAX_CACHE"] = _worker
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
  """A persistent JAX compilation cache for one test module whose runs compile the same programs
  (opt in with `pytestmark = pytest.mark.usefixtures("module_compilation_cache")`)."""
  import jax
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)
