import os
import tempfile

import pytest

# One torch thread pool per test process: the suite runs on 2 cores and must not oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Head profiles computed by tests go to a scratch dir, never into the repo's results/profiles.
os.environ.setdefault("KVBENCH_PROFILES", tempfile.mkdtemp(prefix="kvbench-profiles-"))


@pytest.fixture(scope="session")
def tokenizer():
    from kvbench.models import load_tokenizer
    return load_tokenizer("smollm2-135m")
