import os

# Before torch loads: no busy-waiting OpenMP threads on the shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from models import make_family  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """The tiny Llama family of tests/models.py (base + 3 fine-tunes, seed 0), read-only:
    tests that need another family define their own `family` fixture."""
    return make_family(tmp_path_factory.mktemp("family"))
