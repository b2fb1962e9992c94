import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so its tolerances hold on every run."""
    torch.manual_seed(0)
