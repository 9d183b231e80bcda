import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# One torch thread pool per test process: the suite runs on 2 cores and must not oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Head profiles computed by tests go to a scratch dir, never into the repo's results/profiles.
os.environ.setdefault("KVBENCH_PROFILES", tempfile.mkdtemp(prefix="kvbench-profiles-"))


@pytest.fixture(scope="session")
def tokenizer():
    from kvbench.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def bench_module():
    """load(name): bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    root = Path(__file__).resolve().parents[1] / "bench"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture
def interpret_env(request, monkeypatch):
    """Keep TRITON_INTERPRET=1 visible while a kernel test module's interpreted kernels run (its MODE:
    tests/triton_modes.py)."""
    import triton_modes
    triton_modes.interpret_env(request.module.MODE, monkeypatch)
