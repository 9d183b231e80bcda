import os

import pytest

# One torch thread pool per test process: the suite runs on 2 cores and must not oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tokenizer():
    from kvbench.models import load_tokenizer
    return load_tokenizer("smollm2-135m")
