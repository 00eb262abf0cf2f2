import os

# Before torch loads: no busy-waiting OpenMP threads on the shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from models import make_family, write_config  # noqa: E402

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


# ft3's weight is a gradient over the layers: mergekit interpolates it (t = layer / (LAYERS - 1)).
MODEL_PARAMETERS = [{"weight": 1.0}, {"weight": 0.5}, {"weight": [1.0, 0.2]}]


@pytest.fixture(scope="module")
def cfs_config(family, tmp_path_factory):
    """wudi_cfs on `family` with omega 0.2, lambda 0.9 and MODEL_PARAMETERS (test_cli, test_report)."""
    base, *models = family
    root = tmp_path_factory.mktemp("cfs")
    return write_config(root / "cfs.yml", "wudi_cfs", base, models, {"omega": 0.2, "lambda": 0.9}, MODEL_PARAMETERS)
