"""Shared test settings: float64 by default where exactness is claimed, no files left behind."""

import atexit
import os
import shutil
import tempfile

# Everything the suite's tools would otherwise keep in the home or project folder goes
# into one temporary folder of this session, which subprocesses inherit (through the
# environment) and which is removed at exit:
# - the native CSR kernels, compiled on first use into ITERNN_CACHE_DIR (default
#   ~/.cache/iternn);
# - matplotlib's font cache (MPLCONFIGDIR, default ~/.cache/matplotlib);
# - hypothesis's storage (default ./.hypothesis, which it writes even without an example
#   database).
_scratch = tempfile.mkdtemp(prefix="iternn-tests-")
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
for _var, _sub in (("ITERNN_CACHE_DIR", "iternn"), ("MPLCONFIGDIR", "matplotlib"),
                   ("HYPOTHESIS_STORAGE_DIRECTORY", "hypothesis")):
    os.environ[_var] = os.path.join(_scratch, _sub)

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"])

# No example database: the same examples on every run, nothing stored.
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
