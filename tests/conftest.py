"""Shared fixtures."""
import pytest


@pytest.fixture(params=["fast", "plain"])
def path(request, monkeypatch):
    """Run the test twice: on the Numba kernels and on the plain NumPy layers (NPGPT2_PLAIN=1)."""
    if request.param == "plain":
        monkeypatch.setenv("NPGPT2_PLAIN", "1")
    else:
        monkeypatch.delenv("NPGPT2_PLAIN", raising=False)
    return request.param
