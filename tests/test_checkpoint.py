"""checkpoint.py: formats, wrappers, prefixes, safety (payloads never run), NaN rejection, round trip."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import pytest
import torch

from backdoor_cli.checkpoint import read_checkpoint, scan_pickle_globals, strip_prefixes, write_safetensors
from backdoor_cli.errors import InputError, UnsafeInputError


def _state():
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.zeros(4),
        "fc.weight": torch.randn(10, 4),
        "bn.num_batches_tracked": torch.tensor(3),
    }


class Payload:
    """A pickle that would create a marker file if anything ever unpickled it unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_round_trip_with_metadata(tmp_path):
    state = _state()
    sha = write_safetensors(tmp_path / "m.safetensors", state, {"arch": "x", "num_classes": 10})
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.format == "safetensors" and ckpt.sha256 == sha
    assert ckpt.metadata == {"arch": "x", "num_classes": 10}
    assert set(ckpt.state_dict) == set(state)
    assert torch.equal(ckpt.state_dict["fc.weight"], state["fc.weight"])
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temp file"


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_torch_wrappers_and_prefixes(tmp_path, wrapper, prefix):
    state = {prefix + k: v for k, v in _state().items()}
    obj = state if wrapper is None else {wrapper: state, "epoch": 7, "best_prec1": 91.2}
    torch.save(obj, tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert set(ckpt.state_dict) == set(_state())
    assert ckpt.wrapper == wrapper
    assert (ckpt.stripped_prefix or "") == prefix


def test_legacy_torch_format(tmp_path):
    torch.save(_state(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(tmp_path / "old.pth")
    assert ckpt.format == "torch-legacy" and "fc.weight" in ckpt.state_dict


def test_numpy_members_allowed_like_backdoorbench(tmp_path):
    np = pytest.importorskip("numpy")
    torch.save({"model": _state(), "bd_train_idx": np.arange(5), "num_classes": 10}, tmp_path / "attack_result.pt")
    ckpt = read_checkpoint(tmp_path / "attack_result.pt")
    assert ckpt.wrapper == "model" and "bd_train_idx" not in ckpt.state_dict


def test_raw_pickle_payload_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Payload(marker)}))
    with pytest.raises(UnsafeInputError) as info:
        read_checkpoint(tmp_path / "evil.pt")
    assert info.value.exit_code == 3 and "system" in str(info.value)
    assert not marker.exists()


def test_zip_pickle_payload_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeInputError):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_scan_finds_stack_global():
    names = scan_pickle_globals(pickle.dumps(Payload("/nonexistent"), protocol=4))
    assert any(n.endswith("system") for n in names)


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "garbage", "truncated_zip", "truncated_st"])
def test_bad_files_are_input_errors(tmp_path, case):
    path = tmp_path / "m.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    elif case == "truncated_zip":
        buf = io.BytesIO()
        torch.save(_state(), buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "truncated_st":
        write_safetensors(path, _state(), {})
        path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError) as info:
        read_checkpoint(path)
    assert info.value.exit_code == 2
    assert "\n" not in info.value.message


def test_lying_safetensors_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(InputError):
        read_checkpoint(tmp_path / "lie.safetensors")


def test_nan_weights_rejected(tmp_path):
    state = _state()
    state["fc.weight"][0, 0] = float("nan")
    write_safetensors(tmp_path / "nan.safetensors", state, {})
    with pytest.raises(InputError, match="NaN or Inf.*fc.weight"):
        read_checkpoint(tmp_path / "nan.safetensors")


def test_integer_only_tensors_rejected(tmp_path):
    write_safetensors(tmp_path / "int.safetensors", {"w": torch.ones(3, dtype=torch.int64)}, {})
    with pytest.raises(InputError, match="floating-point"):
        read_checkpoint(tmp_path / "int.safetensors")


def test_no_tensors_in_wrapper(tmp_path):
    torch.save({"epoch": 3, "name": "x"}, tmp_path / "m.pt")
    with pytest.raises(InputError, match="no tensors"):
        read_checkpoint(tmp_path / "m.pt")


def test_strip_prefixes_only_when_all_keys_share_it():
    state, prefix = strip_prefixes({"module.a": torch.zeros(1), "b": torch.zeros(1)})
    assert prefix is None and set(state) == {"module.a", "b"}


def test_corrupt_zip_member(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02not a pickle")
    (tmp_path / "bad.pt").write_bytes(buf.getvalue())
    with pytest.raises(InputError):
        read_checkpoint(tmp_path / "bad.pt")


def test_nan_check_is_exact_behind_the_fused_norms():
    """check_tensors asks fused norms first: a norm that overflows on finite fp16 weights must not refuse
    them, and a NaN or Inf in any dtype is still named."""
    from pathlib import Path

    from backdoor_cli.checkpoint import check_tensors

    big = torch.full((8,), 60000.0, dtype=torch.float16)  # finite, but its norm overflows fp16
    check_tensors({"a": big, "b": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(3)}, Path("x"))
    for bad in (
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf")], dtype=torch.float64),
        torch.tensor([float("-inf")], dtype=torch.bfloat16),
    ):
        with pytest.raises(InputError, match="1 tensor.*: bad"):
            check_tensors({"a": big, "bad": bad}, Path("x"))
