"""--device parsing: the same verdict on every machine, whether or not it has a GPU."""

import pytest
import torch

from backdoor_cli.errors import ConfigError
from backdoor_cli.runtime import resolve_device


def _pretend_cuda(monkeypatch, count: int = 1) -> None:
    """Make this machine look like one with `count` GPUs, without touching a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("spec", ["cuda:x", "cuda:", "cuda:-1", "cuda:0:1", "cuda:1.5"])
def test_malformed_cuda_index_is_a_usage_error_on_a_gpu_machine(monkeypatch, spec):
    _pretend_cuda(monkeypatch)
    with pytest.raises(ConfigError) as info:
        resolve_device(spec)
    assert info.value.exit_code == 2 and "cuda:N" in (info.value.hint or "")


@pytest.mark.parametrize("spec", ["cuda:x", "cuda:"])
def test_malformed_cuda_index_gives_the_same_message_without_a_gpu(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="unknown --device"):
        resolve_device(spec)


def test_cuda_index_beyond_the_gpus_present(monkeypatch):
    _pretend_cuda(monkeypatch, count=1)
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize(("spec", "index"), [("cuda", None), ("CUDA:0", 0), (" cuda:1 ", 1)])
def test_valid_cuda_specs(monkeypatch, spec, index):
    _pretend_cuda(monkeypatch, count=2)
    device = resolve_device(spec)
    assert device.type == "cuda" and device.index == index
