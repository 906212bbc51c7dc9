"""Shared test settings: float64 by default where exactness is claimed, no files left behind."""

import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# No example database: the suite leaves no files outside temporary folders.
settings.register_profile(
    "iternn",
    database=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    deadline=None,
    max_examples=int(os.environ.get("ITERNN_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("iternn")

# The tests use tiny tensors: one intra-op thread is much faster for them on a busy
# 2-core machine (benchmarks run outside the suite with the default).
import torch  # noqa: E402

torch.set_num_threads(1)

# The native CSR kernels are compiled on first use into ITERNN_CACHE_DIR (by default
# ~/.cache/iternn): the suite builds them once into a temporary folder of its own, which
# subprocesses inherit, and removes it at exit.
_cache = tempfile.mkdtemp(prefix="iternn-test-cache-")
os.environ["ITERNN_CACHE_DIR"] = _cache
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
