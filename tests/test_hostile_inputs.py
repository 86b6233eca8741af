"""Hostile inputs through the CLI: every path an attacker (or an accident) controls.

Each case asserts the exit code (2 bad input, 3 unsafe, 1 gate, 130 interrupted), a short message on
stderr naming the problem (1..3 lines, no traceback, nothing on stdout), that no file appeared that
was not there before (no outputs, no temp files), and that inputs are untouched.

Cases that expose a library bug are kept and marked `xfail(strict=True)` with the reason; when the
bug is fixed the xfail turns into an XPASS failure and the marker must be removed.
See docs/security.md for the threat model and the list of cases.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_cli.cli import app
from helpers import make_npz_dataset, train_toy_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 3-class 12x12 RGB toy dataset and a backdoored test_tiny model trained on it by `bdclean train`."""
    toy = train_toy_model(tmp_path_factory.mktemp("hostile"))
    from safetensors import safe_open

    with safe_open(str(toy["model"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["bdclean"])
    return {**toy, "state": state, "meta": meta, "head": meta["head"]}


def files_under(root: Path) -> dict[str, str]:
    """Every file (and link) under root with a content hash: to spot new, changed or removed files."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_symlink():
            found[str(path)] = "link->" + os.readlink(path)
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def invoke(*args, root: Path | None = None):
    """Run the CLI in-process; with `root`, also return the files that appeared or changed under it."""
    before = files_under(root) if root is not None else {}
    result = runner.invoke(app, [str(a) for a in args])
    if root is None:
        return result
    after = files_under(root)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return result, changed


def check_refused(result, code: int, *words: str) -> None:
    """Exit `code`, a short stderr message containing `words`, nothing on stdout, no traceback."""
    out = result.output
    assert result.exit_code == code, f"expected exit {code}, got {result.exit_code}:\n{out}"
    assert "Traceback" not in out and "internal error" not in out, out
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # Warnings printed before the failure (e.g. advice about a finished tuning run) are not part of
    # the error message; the message itself starts at "error:".
    starts = [i for i, line in enumerate(lines) if line.lower().startswith("error")]
    assert starts, f"no 'error:' line in stderr:\n{result.stderr}"
    lines = lines[starts[0] :]
    assert 1 <= len(lines) <= 3, f"expected a 1-3 line message, got {len(lines)}:\n{result.stderr}"
    assert result.stdout.strip() == "", f"stdout must stay empty on errors:\n{result.stdout}"
    for word in words:
        assert word.lower() in result.stderr.lower(), f"{word!r} not in message:\n{result.stderr}"


def save_st(path: Path, state: dict, meta: dict | None) -> Path:
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata=None if meta is None else {"bdclean": json.dumps(meta)},
    )
    return path


def torch_save(path: Path, obj, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class Payload:
    """Unpickling this runs `touch MARKER`: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _u(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def stack_global_evasion(marker: Path) -> bytes:
    """A protocol-4 pickle calling posix.system that a naive opcode scanner reads as collections.OrderedDict:
    push 'posix' 'system' 'collections' 'OrderedDict', POP POP, STACK_GLOBAL, then call it."""
    return (
        b"\x80\x04"
        + _u("posix")
        + _u("system")
        + _u("collections")
        + _u("OrderedDict")
        + b"00"
        + b"\x93"
        + _u(f"touch {marker}")
        + b"\x85R."
    )


# ---------------------------------------------------------------- checkpoints


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _safetensors_join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_header(toy, path: Path, edit) -> Path:
    header, body = _safetensors_parts(toy["model"])
    edit(header, body)
    path.write_bytes(_safetensors_join(header, body))
    return path


def _first_weight(header: dict) -> str:
    return next(k for k in header if k != "__metadata__" and k.endswith("weight"))


def _with(state: dict, **changes) -> dict:
    out = dict(state)
    for key, value in changes.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


def _evil_factory_file(root: Path, marker: Path) -> Path:
    evil = root / "evil_arch.py"
    evil.write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "def factory(num_classes=10, in_channels=3):\n    raise RuntimeError('factory ran')\n"
    )
    return evil


def _bad_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (a decompression bomb by header)."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    # A tiny valid IDAT and IEND: the file is a well-formed PNG whose header alone asks for the pixels.
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    png += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    png += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(png)
    return path


def _cases_checkpoint():
    """(id, builder(tmp, toy) -> path, extra CLI args, exit code, words, stage, marks).

    stage 'read': `inspect` must fail the same way; stage 'load': inspect succeeds, evaluate fails."""
    h = lambda toy: toy["head"]  # noqa: E731
    cases = [
        (
            "pickle-reduce-legacy",
            lambda t, toy: _w(t / "evil.pth", pickle.dumps({"state_dict": Payload(t / "PWNED")}, protocol=2)),
            [],
            3,
            ["refused", "system"],
            "read",
            (),
        ),
        (
            "pickle-reduce-protocol4",
            lambda t, toy: _w(t / "evil.pt", pickle.dumps([Payload(t / "PWNED")], protocol=4)),
            [],
            3,
            ["refused"],
            "read",
            (),
        ),
        (
            "pickle-reduce-protocol0",
            lambda t, toy: _w(t / "evil.pt", pickle.dumps(Payload(t / "PWNED"), protocol=0)),
            [],
            3,
            ["refused"],
            "read",
            (),
        ),
        (
            "pickle-in-torch-zip",
            lambda t, toy: torch_save(t / "evil.pt", {"state_dict": toy["state"], "x": Payload(t / "PWNED")}),
            [],
            3,
            ["refused", "system"],
            "read",
            (),
        ),
        (
            "pickle-in-torch-legacy-format",
            lambda t, toy: torch_save(t / "evil.pt", {"w": toy["state"], "x": Payload(t / "PWNED")}, legacy=True),
            [],
            3,
            ["refused"],
            "read",
            (),
        ),
        (
            "pickle-builtins-eval",
            lambda t, toy: _w(t / "evil.pt", b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1)\x85R."),
            [],
            3,
            ["refused", "eval"],
            "read",
            (),
        ),
        (
            "pickle-scanner-evasion",
            lambda t, toy: _w(t / "evil.pt", stack_global_evasion(t / "PWNED")),
            [],
            3,
            ["refused"],
            "read",
            (),
        ),
        ("empty-file", lambda t, toy: _w(t / "empty.pt", b""), [], 2, ["empty"], "read", ()),
        ("directory", lambda t, toy: _mkdir(t / "ckpt.pt"), [], 2, ["directory"], "read", ()),
        ("missing-file", lambda t, toy: t / "nope.safetensors", [], 2, ["not found"], "read", ()),
        ("fifo", lambda t, toy: _fifo(t / "pipe.pt"), [], 2, [], "read", ()),
        (
            "text-file",
            lambda t, toy: _w(t / "notes.pt", b"hello, I am not a model\n"),
            [],
            2,
            ["not a checkpoint"],
            "read",
            (),
        ),
        (
            "truncated-safetensors",
            lambda t, toy: _w(t / "cut.safetensors", toy["model"].read_bytes()[:-50]),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "truncated-header",
            lambda t, toy: _w(t / "cut.safetensors", toy["model"].read_bytes()[:40]),
            [],
            2,
            ["header"],
            "read",
            (),
        ),
        (
            "truncated-torch-zip",
            lambda t, toy: _w(t / "cut.pt", _torch_bytes(toy["state"])[:-300]),
            [],
            2,
            [],
            "read",
            (),
        ),
        (
            "header-length-huge",
            lambda t, toy: _w(t / "h.safetensors", struct.pack("<Q", 2**63) + toy["model"].read_bytes()[8:]),
            [],
            2,
            ["header"],
            "read",
            (),
        ),
        (
            "header-not-json",
            lambda t, toy: _w(t / "h.safetensors", struct.pack("<Q", 8) + b"{not js}" + b"\0" * 8),
            [],
            2,
            ["header"],
            "read",
            (),
        ),
        (
            "header-offsets-beyond-file",
            lambda t, toy: _edit_header(
                toy,
                t / "o.safetensors",
                lambda hd, body: hd[_first_weight(hd)].update(data_offsets=[0, len(body) + 4096]),
            ),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "header-offsets-overlap",
            lambda t, toy: _edit_header(
                toy, t / "o.safetensors", lambda hd, body: hd.update({"alias.weight": dict(hd[_first_weight(hd)])})
            ),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "header-offsets-reversed",
            lambda t, toy: _edit_header(
                toy,
                t / "o.safetensors",
                lambda hd, body: hd[_first_weight(hd)].update(data_offsets=hd[_first_weight(hd)]["data_offsets"][::-1]),
            ),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "header-dtype-lie",
            lambda t, toy: _edit_header(
                toy, t / "d.safetensors", lambda hd, body: hd[_first_weight(hd)].update(dtype="F64")
            ),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "header-dtype-unknown",
            lambda t, toy: _edit_header(
                toy, t / "d.safetensors", lambda hd, body: hd[_first_weight(hd)].update(dtype="Q7")
            ),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "header-shape-lie",
            lambda t, toy: _edit_header(
                toy, t / "s.safetensors", lambda hd, body: hd[_first_weight(hd)].update(shape=[2**31, 2**31])
            ),
            [],
            2,
            ["corrupt"],
            "read",
            (),
        ),
        (
            "metadata-not-json",
            lambda t, toy: _edit_header(
                toy, t / "m.safetensors", lambda hd, body: hd.update(__metadata__={"bdclean": "{oops"})
            ),
            [],
            2,
            ["metadata"],
            "read",
            (),
        ),
        (
            "metadata-not-object",
            lambda t, toy: _edit_header(
                toy, t / "m.safetensors", lambda hd, body: hd.update(__metadata__={"bdclean": "[1, 2]"})
            ),
            [],
            2,
            ["metadata"],
            "read",
            (),
        ),
        (
            "integer-tensors-only",
            lambda t, toy: save_st(t / "i.safetensors", {k: v.to(torch.int64) for k, v in toy["state"].items()}, None),
            [],
            2,
            ["floating"],
            "read",
            (),
        ),
        (
            "integer-head-weight",
            lambda t, toy: save_st(
                t / "i.safetensors",
                _with(
                    toy["state"],
                    **{f"{h(toy)}.weight": torch.ones_like(toy["state"][f"{h(toy)}.weight"], dtype=torch.int64)},
                ),
                toy["meta"],
            ),
            [],
            2,
            [".weight", "dtype"],
            "load",
            (),
        ),
        (
            "nan-weights",
            lambda t, toy: save_st(
                t / "n.safetensors",
                _with(
                    toy["state"],
                    **{f"{h(toy)}.weight": torch.full_like(toy["state"][f"{h(toy)}.weight"], float("nan"))},
                ),
                toy["meta"],
            ),
            [],
            2,
            ["nan"],
            "read",
            (),
        ),
        (
            "inf-weights-fp16",
            lambda t, toy: save_st(
                t / "n.safetensors",
                {
                    k: (v.half() if v.is_floating_point() else v)
                    for k, v in _with(
                        toy["state"],
                        **{f"{h(toy)}.bias": torch.full_like(toy["state"][f"{h(toy)}.bias"], float("inf"))},
                    ).items()
                },
                toy["meta"],
            ),
            [],
            2,
            ["inf"],
            "read",
            (),
        ),
        ("bare-tensor", lambda t, toy: torch_save(t / "t.pt", torch.ones(3)), [], 2, ["state_dict"], "read", ()),
        ("list-of-tensors", lambda t, toy: torch_save(t / "t.pt", [torch.ones(3)]), [], 2, ["state_dict"], "read", ()),
        (
            "dict-without-tensors",
            lambda t, toy: torch_save(t / "t.pt", {"epoch": 3, "acc": 0.9}),
            [],
            2,
            ["no tensors"],
            "read",
            (),
        ),
        (
            "integer-keys",
            lambda t, toy: torch_save(t / "t.pt", {1: torch.ones(3), 2: torch.ones(2)}),
            [],
            2,
            ["strings"],
            "read",
            (),
        ),
        ("wrong-class-count-flag", lambda t, toy: toy["model"], ["--num-classes", "5"], 2, ["5"], "load", ()),
        (
            "head-for-4-classes",
            lambda t, toy: save_st(
                t / "c.safetensors",
                _with(
                    toy["state"],
                    **{
                        f"{h(toy)}.weight": torch.zeros(4, toy["state"][f"{h(toy)}.weight"].shape[1]),
                        f"{h(toy)}.bias": torch.zeros(4),
                    },
                ),
                None,
            ),
            [],
            2,
            ["classes"],
            "load",
            (),
        ),
        (
            "missing-key",
            lambda t, toy: save_st(t / "k.safetensors", _with(toy["state"], **{f"{h(toy)}.bias": None}), toy["meta"]),
            [],
            2,
            ["missing", "bias"],
            "load",
            (),
        ),
        (
            "unexpected-key",
            lambda t, toy: save_st(
                t / "k.safetensors", _with(toy["state"], **{"extra.weight": torch.zeros(2, 2)}), toy["meta"]
            ),
            [],
            2,
            ["unexpected", "extra.weight"],
            "load",
            (),
        ),
        (
            "reshaped-key",
            lambda t, toy: save_st(
                t / "k.safetensors",
                _with(toy["state"], **{f"{h(toy)}.weight": toy["state"][f"{h(toy)}.weight"].reshape(-1, 1)}),
                toy["meta"],
            ),
            [],
            2,
            [f"{'{}'}.weight"],
            "load",
            (),
        ),
        (
            "other-architecture",
            lambda t, toy: save_st(t / "a.safetensors", _simple_cnn_state(), toy["meta"]),
            [],
            2,
            ["missing"],
            "load",
            (),
        ),
        ("other-architecture-flag", lambda t, toy: toy["model"], ["--arch", "simple_cnn"], 2, ["missing"], "load", ()),
        (
            "metadata-arch-is-python-file",
            lambda t, toy: save_st(
                t / "m.safetensors",
                toy["state"],
                {**toy["meta"], "arch": f"{_evil_factory_file(t, t / 'PWNED')}:factory"},
            ),
            [],
            2,
            ["arch"],
            "load",
            (),
        ),
        (
            "metadata-arch-not-a-string",
            lambda t, toy: save_st(t / "m.safetensors", toy["state"], {**toy["meta"], "arch": 7}),
            [],
            2,
            ["arch"],
            "load",
            (),
        ),
        (
            "metadata-arch-unknown",
            lambda t, toy: save_st(t / "m.safetensors", toy["state"], {**toy["meta"], "arch": "nosuchnet"}),
            [],
            2,
            ["nosuchnet"],
            "load",
            (),
        ),
        (
            "metadata-mean-not-numbers",
            lambda t, toy: save_st(
                t / "m.safetensors",
                toy["state"],
                {**toy["meta"], "normalization": {"mean": "abc", "std": [0.2, 0.2, 0.2]}},
            ),
            [],
            2,
            ["mean"],
            "load",
            (),
        ),
        (
            "metadata-std-nan",
            lambda t, toy: save_st(
                t / "m.safetensors",
                toy["state"],
                {**toy["meta"], "normalization": {"mean": [0.5] * 3, "std": [float("nan")] * 3}},
            ),
            [],
            2,
            ["std"],
            "load",
            (),
        ),
        (
            "metadata-std-zero",
            lambda t, toy: save_st(
                t / "m.safetensors",
                toy["state"],
                {**toy["meta"], "normalization": {"mean": [0.5] * 3, "std": [0, 1, 1]}},
            ),
            [],
            2,
            ["std"],
            "load",
            (),
        ),
        (
            "metadata-head-unknown",
            lambda t, toy: save_st(t / "m.safetensors", toy["state"], {**toy["meta"], "head": "no.such.layer"}),
            [],
            2,
            ["no.such.layer"],
            "load",
            (),
        ),
        (
            "metadata-trigger-not-mapping",
            lambda t, toy: save_st(t / "m.safetensors", toy["state"], {**toy["meta"], "trigger": "rm -rf /"}),
            [],
            2,
            ["trigger"],
            "load",
            (),
        ),
        (
            "metadata-trigger-reads-system-file",
            lambda t, toy: save_st(
                t / "m.safetensors", toy["state"], {**toy["meta"], "trigger": {"type": "patch", "image": "/etc/passwd"}}
            ),
            [],
            2,
            ["image"],
            "load",
            (),
        ),
    ]
    for case_id, build, args, code, words, stage, marks in cases:
        yield pytest.param(build, args, code, words, stage, id=case_id, marks=marks)


def _w(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _simple_cnn_state() -> dict:
    from backdoor_cli.models import build_model

    return build_model("simple_cnn", 3, 3).state_dict()


@pytest.mark.parametrize("build, args, code, words, stage", list(_cases_checkpoint()))
def test_hostile_checkpoint(toy, tmp_path, build, args, code, words, stage):
    path = build(tmp_path, toy)
    words = [w.replace("{}", toy["head"]) for w in words]
    before = toy["model"].read_bytes()
    result, changed = invoke(
        "evaluate", path, "--data", toy["data"], "--device", "cpu", "--quiet", *args, root=tmp_path
    )
    check_refused(result, code, *words)
    assert not (tmp_path / "PWNED").exists(), "a checkpoint ran code"
    assert changed == [], f"files changed: {changed}"
    assert toy["model"].read_bytes() == before
    if stage == "read":
        result = invoke("inspect", path)
        check_refused(result, code, *words)
        assert not (tmp_path / "PWNED").exists()


def test_hostile_checkpoint_through_purify_and_compare(toy, tmp_path):
    """The same reader guards every command: purify and compare refuse a malicious pickle with exit 3."""
    evil = torch_save(tmp_path / "evil.pt", {"state_dict": toy["state"], "x": Payload(tmp_path / "PWNED")})
    result, changed = invoke("purify", evil, "--data", toy["data"], "--out", tmp_path / "out", "--quiet", root=tmp_path)
    check_refused(result, 3, "refused")
    result2, changed2 = invoke("compare", toy["model"], evil, "--data", toy["data"], "--quiet", root=tmp_path)
    check_refused(result2, 3, "refused")
    assert changed == changed2 == [] and not (tmp_path / "out").exists()
    assert not (tmp_path / "PWNED").exists()
    converted = tmp_path / "converted.safetensors"
    result3, changed3 = invoke("convert", evil, "--data", toy["data"], "--out", converted, "--quiet", root=tmp_path)
    check_refused(result3, 3, "refused")
    # A hostile --clean-reference is read by the same reader before anything runs in it.
    as_reference = ("scan", toy["model"], "--data", toy["data"], "--clean-reference", evil, "--quiet")
    result4, changed4 = invoke(*as_reference, root=tmp_path)
    check_refused(result4, 3, "refused")
    assert changed3 == changed4 == [] and not converted.exists() and not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------- run configs (--config)


def _cases_config():
    evaluate = ("evaluate",)
    purify = ("purify",)
    cases = [
        ("python-object-apply", evaluate, "!!python/object/apply:os.system ['touch {root}/PWNED']\n", 2, ["yaml"], ()),
        (
            "python-object-in-value",
            evaluate,
            "data: !!python/object/apply:os.system ['touch {root}/PWNED']\n",
            2,
            ["yaml"],
            (),
        ),
        ("python-name-tag", evaluate, "device: !!python/name:os.system\n", 2, ["yaml"], ()),
        ("non-utf8", evaluate, b"data: \xff\xfe caf\xe9\n", 2, ["utf-8"], ()),
        ("not-a-mapping", evaluate, "- data\n- cpu\n", 2, ["mapping"], ()),
        ("scalar", evaluate, "just words\n", 2, ["mapping"], ()),
        ("invalid-yaml", evaluate, "data: [unclosed\n", 2, ["yaml"], ()),
        ("deeply-nested", evaluate, "data: " + "[" * 5000 + "]" * 5000 + "\n", 2, [], ()),
        ("unknown-key", evaluate, "data: {data}\nepochz: 3\n", 2, ["epochz"], ()),
        ("key-for-another-command", evaluate, "data: {data}\nlr: 0.1\n", 2, ["lr"], ()),
        ("config-key-recursion", evaluate, "config: other.yaml\n", 2, ["config"], ()),
        ("wrong-type-int", purify, "data: {data}\nepochs: ten\n", 2, ["epochs"], ()),
        ("wrong-type-bool-as-int", purify, "data: {data}\nepochs: true\n", 2, ["epochs"], ()),
        ("wrong-type-list", evaluate, "data: {data}\ndevice: [cpu]\n", 2, ["device"], ()),
        ("wrong-type-bool", purify, "data: {data}\nforce: 'yes'\n", 2, ["force"], ()),
        ("wrong-type-mean", evaluate, "data: {data}\nmean: {a: 1}\n", 2, ["mean"], ()),
        ("mean-not-finite", evaluate, "data: {data}\nmean: [.nan, 0.5, 0.5]\n", 2, ["mean"], ()),
        ("gate-out-of-range", evaluate, "data: {data}\nmax-asr: 7\n", 2, ["out of range"], ()),
        ("gate-not-a-number", evaluate, "data: {data}\nmin-acc: lots\n", 2, ["not a number"], ()),
        ("lr-negative", purify, "data: {data}\nlr: -1\n", 2, ["lr"], ()),
        ("epochs-zero", purify, "data: {data}\nepochs: 0\n", 2, ["epochs"], ()),
        ("momentum-one", purify, "data: {data}\nmomentum: 1.0\n", 2, ["momentum"], ()),
        ("tune-batch-zero", purify, "data: {data}\nbatch-size: 0\n", 2, ["batch"], ()),
        ("clean-fraction-above-one", purify, "data: {data}\nclean-fraction: 1.5\n", 2, ["fraction"], ()),
        ("clean-count-zero", purify, "data: {data}\nclean-count: 0\n", 2, [], ()),
        ("eval-batch-zero", evaluate, "data: {data}\nbatch-size: 0\n", 2, ["batch"], ()),
        ("eval-batch-negative", evaluate, "data: {data}\nbatch-size: -4\n", 2, ["batch"], ()),
        ("eval-limit-zero", evaluate, "data: {data}\neval-limit: 0\n", 2, ["eval-limit"], ()),
        ("eval-limit-negative", evaluate, "data: {data}\neval-limit: -5\n", 2, ["eval-limit"], ()),
        ("seed-too-large", evaluate, "data: {data}\nseed: 1180591620717411303424\n", 2, ["seed"], ()),
        ("device-unknown", evaluate, "data: {data}\ndevice: tpu\n", 2, ["device"], ()),
        ("yaml-int-tag-bad-value", evaluate, "data: {data}\neval-limit: !!int many\n", 2, ["yaml"], ()),
        ("yaml-timestamp-tag-bad-value", evaluate, "data: {data}\nseed: !!timestamp x\n", 2, ["yaml"], ()),
    ]
    for case_id, command, text, code, words, marks in cases:
        yield pytest.param(command, text, code, words, id=case_id, marks=marks)


@pytest.mark.parametrize("command, text, code, words", list(_cases_config()))
def test_hostile_config(toy, tmp_path, command, text, code, words):
    cfg = tmp_path / "run.yaml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text.replace("{data}", str(toy["data"])).replace("{root}", str(tmp_path)))
    # A flag beats the config file, so --device is only added when the case does not test the device key.
    device = [] if isinstance(text, str) and "device:" in text else ["--device", "cpu"]
    args = [*command, toy["model"], "--config", cfg, *device, "--quiet"]
    if command[0] == "purify":
        args += ["--out", tmp_path / "out"]
    result, changed = invoke(*args, root=tmp_path)
    check_refused(result, code, *words)
    assert changed == [] and not (tmp_path / "out").exists(), changed
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.parametrize("what", ["missing", "directory", "fifo", "huge"])
def test_hostile_config_file_itself(toy, tmp_path, what):
    cfg = tmp_path / "run.yaml"
    if what == "directory":
        cfg.mkdir()
    elif what == "fifo":
        os.mkfifo(cfg)  # must not block waiting for a writer
    elif what == "huge":
        cfg.write_text("# padding\n" * 200_000)
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--config", cfg, "--quiet")
    check_refused(result, 2, "config")


def test_bad_flag_value_is_a_short_usage_error(toy):
    result = invoke("purify", toy["model"], "--epochs", "ten")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "epochs" in result.output.lower()


# ---------------------------------------------------------------- trigger specs (--trigger)


def _cases_trigger():
    cases = [
        ("python-tag", "!!python/object/apply:os.system ['touch {root}/PWNED']\n", 2, ["yaml"]),
        (
            "python-tag-in-field",
            "type: patch\nsize: !!python/object/apply:os.system ['touch {root}/PWNED']\n",
            2,
            ["yaml"],
        ),
        ("non-utf8", b"type: patch\nname: caf\xe9\n", 2, ["utf-8"]),
        ("empty", "", 2, ["empty"]),
        ("not-a-mapping", "- patch\n", 2, ["mapping"]),
        ("missing-type", "size: 3\n", 2, ["type"]),
        ("unknown-type", "type: laser\n", 2, ["type"]),
        ("unknown-key", "type: patch\nsizee: 3\n", 2, ["sizee"]),
        ("key-of-other-type", "type: patch\nalpha: 0.2\n", 2, ["alpha"]),
        ("wrong-type-size", "type: patch\nsize: big\n", 2, ["size"]),
        ("bool-as-number", "type: patch\nsize: true\n", 2, ["size"]),
        ("size-zero", "type: patch\nsize: 0\n", 2, ["size"]),
        ("alpha-above-one", "type: blend\nalpha: 1.5\n", 2, ["alpha"]),
        ("alpha-nan", "type: blend\nalpha: .nan\n", 2, ["alpha"]),
        ("amplitude-negative", "type: sig\namplitude: -4\n", 2, ["amplitude"]),
        ("wanet-k-one", "type: wanet\nk: 1\n", 2, ["k"]),
        ("target-negative", "type: patch\ntarget: -1\n", 2, ["target"]),
        ("target-not-a-class", "type: patch\ntarget: 9\n", 2, ["target"]),
        ("color-channels", "type: patch\ncolor: [1, 2, 3, 4]\n", 2, ["color"]),
        ("color-out-of-range", "type: patch\ncolor: 300\n", 2, ["color"]),
        ("position-bad", "type: patch\nposition: middle\n", 2, ["position"]),
        ("position-outside", "type: patch\nsize: 3\nposition: [11, 11]\n", 2, ["position"]),
        ("patch-larger-than-image", "type: patch\nsize: 13\n", 2, ["larger"]),
        ("patch-image-larger-than-image", "type: patch\nimage: big.png\n", 2, ["larger"]),
        ("missing-image", "type: blend\nimage: nowhere.png\n", 2, ["not found"]),
        ("corrupt-image", "type: blend\nimage: corrupt.png\n", 2, ["not a readable image"]),
        ("image-is-directory", "type: blend\nimage: adir\n", 2, ["not a regular file"]),
        ("image-is-fifo", "type: blend\nimage: afifo\n", 2, ["not a regular file"]),
        ("image-is-text", "type: blend\nimage: notes.txt\n", 2, ["image"]),
        ("image-bomb-header", "type: blend\nimage: bomb.png\n", 2, ["pixels"]),
        ("image-sha-mismatch", "type: blend\nimage: small.png\nimage_sha256: " + "0" * 64 + "\n", 2, ["sha256"]),
        ("mask-missing", "type: image\nimage: small.png\n", 2, ["mask"]),
        ("mask-size-mismatch", "type: image\nimage: small.png\nmask: tiny.png\n", 2, ["mask"]),
        ("yaml-bool-tag-bad-value", "type: patch\nsize: !!bool maybe\n", 2, ["yaml"], ()),
        ("yaml-float-tag-bad-value", "type: blend\nalpha: !!float x\n", 2, ["yaml"], ()),
    ]
    for case_id, text, code, words, *marks in cases:
        yield pytest.param(text, code, words, id=case_id, marks=marks[0] if marks else ())


def _trigger_assets(root: Path) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "small.png")
    Image.new("L", (2, 2), 255).save(root / "tiny.png")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "big.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (root / "notes.txt").write_text("not an image\n")
    (root / "adir").mkdir()
    os.mkfifo(root / "afifo")
    _bad_png_header(root / "bomb.png", 100_000, 100_000)


@pytest.mark.parametrize("text, code, words", list(_cases_trigger()))
def test_hostile_trigger(toy, tmp_path, text, code, words):
    _trigger_assets(tmp_path)
    spec = tmp_path / "trigger.yaml"
    if isinstance(text, bytes):
        spec.write_bytes(text)
    else:
        spec.write_text(text.replace("{root}", str(tmp_path)))
    result, changed = invoke(
        "evaluate", toy["model"], "--data", toy["data"], "--trigger", spec, "--device", "cpu", "--quiet", root=tmp_path
    )
    check_refused(result, code, *words)
    assert changed == [] and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("value", ["nosuchtrigger", "", "/dev/zero", "../../etc/passwd"])
def test_hostile_trigger_argument(toy, value):
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--trigger", value, "--quiet")
    check_refused(result, 2, "trigger")


# ---------------------------------------------------------------- data (--data, --clean-data)


def _npz(root: Path, split: str, **arrays) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / f"{split}.npz", **arrays)


def _good_arrays(n: int = 30, size: int = 12, channels: int = 3, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
        "y": (np.arange(n) % classes).astype(np.uint8),
    }


def _image_folder(root: Path, classes=("a", "b", "c"), per_class: int = 4, size=(12, 12), mode: str = "RGB"):
    from PIL import Image

    for split in ("train", "test"):
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new(mode, size, 40 * i + j).save(folder / f"{j}.png")
    return root


def _data_case(kind: str, root: Path) -> Path:
    data = root / "d"
    good = _good_arrays()
    if kind == "xy-length-mismatch":
        _npz(data, "test", x=good["x"], y=good["y"][:-3])
    elif kind == "label-negative":
        _npz(data, "test", x=good["x"], y=good["y"].astype(np.int64) - 1)
    elif kind == "label-beyond-known-dataset":
        _npz(root / "cifar10", "test", x=good["x"], y=(good["y"].astype(np.int64) + 8))
        return root / "cifar10"
    elif kind == "object-array":
        _npz(data, "test", x=np.array([object()] * 3, dtype=object), y=good["y"][:3])
    elif kind == "float-images":
        _npz(data, "test", x=good["x"].astype(np.float32) / 255, y=good["y"])
    elif kind == "missing-y":
        _npz(data, "test", x=good["x"])
    elif kind == "x-wrong-rank":
        _npz(data, "test", x=good["x"].reshape(30, -1), y=good["y"])
    elif kind == "empty-split":
        _npz(data, "test", x=good["x"][:0], y=good["y"][:0])
    elif kind == "npz-is-garbage":
        data.mkdir()
        (data / "test.npz").write_bytes(b"PK\x03\x04" + os.urandom(100))
    elif kind == "npz-is-pickle":
        data.mkdir()
        (data / "test.npz").write_bytes(pickle.dumps({"x": Payload(root / "PWNED")}))
    elif kind == "wrong-channel-count":
        _npz(data, "test", **_good_arrays(channels=1))
    elif kind == "missing-directory":
        return root / "nowhere"
    elif kind == "empty-directory":
        data.mkdir()
    elif kind == "folder-corrupt-image":
        _image_folder(data)
        (data / "test" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
    elif kind == "folder-non-image-file":
        _image_folder(data)
        (data / "test" / "a" / "readme.png").write_text("I am text")
    elif kind == "folder-mixed-sizes":
        _image_folder(data)
        from PIL import Image

        Image.new("RGB", (13, 12)).save(data / "test" / "c" / "odd.png")
    elif kind == "folder-mixed-modes":
        _image_folder(data)
        from PIL import Image

        Image.new("L", (12, 12)).save(data / "test" / "c" / "gray.png")
    elif kind == "folder-wrong-channels":
        _image_folder(data, mode="L")
    elif kind == "folder-bomb-header":
        _image_folder(data)
        _bad_png_header(data / "test" / "a" / "bomb.png", 100_000, 100_000)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return data


DATA_CASES = [
    ("xy-length-mismatch", ["length", "x"]),
    ("label-negative", ["label"]),
    ("label-beyond-known-dataset", ["label"]),
    ("object-array", []),
    ("float-images", ["uint8"]),
    ("missing-y", ["y"]),
    ("x-wrong-rank", []),
    ("empty-split", []),
    ("npz-is-garbage", ["test.npz"]),
    ("npz-is-pickle", []),
    ("wrong-channel-count", ["channel"]),
    ("missing-directory", ["nowhere"]),
    ("empty-directory", []),
    ("folder-corrupt-image", ["1.png"]),
    ("folder-non-image-file", ["readme.png"]),
    ("folder-mixed-sizes", ["odd.png"]),
    ("folder-wrong-channels", ["channel"]),
    ("folder-bomb-header", ["bomb.png"]),
]


@pytest.mark.parametrize("kind, words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_hostile_data(toy, tmp_path, kind, words):
    data = _data_case(kind, tmp_path)
    result, changed = invoke("evaluate", toy["model"], "--data", data, "--device", "cpu", "--quiet", root=tmp_path)
    check_refused(result, 2, *words)
    assert changed == [] and not (tmp_path / "PWNED").exists()


def test_grayscale_image_in_a_colour_folder_is_converted(toy, tmp_path):
    """Real folders mix modes (Tiny-ImageNet holds grayscale JPEGs): they are replicated to RGB, not refused."""
    data = _data_case("folder-mixed-modes", tmp_path)
    result = invoke("evaluate", toy["model"], "--data", data, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output


def _clean_case(kind: str, root: Path, toy) -> tuple[list, list[str]]:
    """Arguments for purify's clean-data options, and words the message must hold."""
    if kind == "clean-count-zero":
        return ["--clean-count", "0"], ["clean"]
    if kind == "clean-count-negative":
        return ["--clean-count", "-3"], ["clean"]
    if kind == "clean-fraction-rounds-to-empty":
        return ["--clean-fraction", "0.0001"], ["clean"]
    if kind == "clean-fraction-zero":
        return ["--clean-fraction", "0"], ["clean"]
    if kind == "clean-count-one-class":
        return ["--clean-count", "1"], ["class"]
    if kind == "clean-data-one-class":
        arrays = _good_arrays(classes=1)
        np.savez(root / "one.npz", **arrays)
        return ["--clean-data", root / "one.npz"], ["class"]
    if kind == "clean-data-empty-npz":
        arrays = _good_arrays()
        np.savez(root / "empty.npz", x=arrays["x"][:0], y=arrays["y"][:0])
        return ["--clean-data", root / "empty.npz"], []
    if kind == "clean-data-wrong-size":
        np.savez(root / "big.npz", **_good_arrays(size=16))
        return ["--clean-data", root / "big.npz"], ["16"]
    if kind == "clean-data-wrong-channels":
        np.savez(root / "gray.npz", **_good_arrays(channels=1))
        return ["--clean-data", root / "gray.npz"], ["channel"]
    if kind == "clean-data-label-out-of-range":
        arrays = _good_arrays(classes=5)
        np.savez(root / "five.npz", **arrays)
        return ["--clean-data", root / "five.npz"], ["label"]
    if kind == "clean-data-corrupt-folder":
        _image_folder(root / "cf")
        (root / "cf" / "train" / "a" / "0.png").write_bytes(b"garbage")
        return ["--clean-data", root / "cf" / "train"], ["0.png"]
    if kind == "clean-data-missing":
        return ["--clean-data", root / "absent"], ["absent"]
    if kind == "clean-data-with-count":
        np.savez(root / "ok.npz", **_good_arrays())
        return ["--clean-data", root / "ok.npz", "--clean-count", "9"], ["clean-data"]
    raise AssertionError(kind)  # pragma: no cover


CLEAN_CASES = [
    "clean-count-zero",
    "clean-count-negative",
    "clean-fraction-rounds-to-empty",
    "clean-fraction-zero",
    "clean-count-one-class",
    "clean-data-one-class",
    "clean-data-empty-npz",
    "clean-data-wrong-size",
    "clean-data-wrong-channels",
    "clean-data-label-out-of-range",
    "clean-data-corrupt-folder",
    "clean-data-missing",
    "clean-data-with-count",
]


@pytest.mark.parametrize("kind", CLEAN_CASES)
def test_hostile_clean_data(toy, tmp_path, kind):
    args, words = _clean_case(kind, tmp_path, toy)
    out = tmp_path / "out"
    result, changed = invoke(
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        out,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        *args,
        root=tmp_path,
    )
    check_refused(result, 2, *words)
    assert changed == [] and not any(out.glob("*")), changed


# ---------------------------------------------------------------- outputs (--out)


def _purify(toy, out, *extra, root):
    return invoke(
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        out,
        "--clean-count",
        "30",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--quiet",
        *extra,
        root=root,
    )


def test_out_is_the_input_file(toy, tmp_path):
    ckpt = shutil.copy(toy["model"], tmp_path / "model.safetensors")
    result, changed = _purify(toy | {"model": Path(ckpt)}, ckpt, "--force", root=tmp_path)
    check_refused(result, 2, "is a file")
    assert changed == []


def test_out_holds_the_input_under_an_output_name(toy, tmp_path):
    ckpt = Path(shutil.copy(toy["model"], tmp_path / "purified.safetensors"))
    result, changed = _purify(toy | {"model": ckpt}, tmp_path, "--force", root=tmp_path)
    check_refused(result, 2, "overwrite the input")
    assert changed == []


def test_out_output_is_a_symlink_to_the_input(toy, tmp_path):
    ckpt = Path(shutil.copy(toy["model"], tmp_path / "model.safetensors"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "purified.safetensors").symlink_to(ckpt)
    result, changed = _purify(toy | {"model": ckpt}, tmp_path / "out", "--force", root=tmp_path)
    check_refused(result, 2, "overwrite the input")
    assert changed == []


def test_existing_outputs_need_force(toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}')
    result, changed = _purify(toy, out, root=tmp_path)
    check_refused(result, 2, "--force")
    assert changed == [] and (out / "report.json").read_text() == '{"mine": true}'


def test_symlinked_output_with_force_replaces_the_link_not_its_target(toy, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("do not touch")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").symlink_to(precious)
    result, _ = _purify(toy, out, "--force", root=tmp_path)
    assert result.exit_code == 0, result.output
    assert precious.read_text() == "do not touch" and not (out / "report.md").is_symlink()


def test_out_parent_is_a_file(toy, tmp_path):
    (tmp_path / "afile").write_text("x")
    result, changed = _purify(toy, tmp_path / "afile" / "out", root=tmp_path)
    check_refused(result, 2, "afile")
    assert changed == []


def test_out_under_proc_is_unwritable(toy, tmp_path):
    # As root, permission bits do not stop writes; /proc refuses new entries even to root.
    result, changed = _purify(toy, "/proc/bdclean-test-out", root=tmp_path)
    check_refused(result, 2, "/proc/bdclean-test-out")
    assert changed == [] and not os.path.exists("/proc/bdclean-test-out")


def test_train_out_is_a_directory(toy, tmp_path):
    result = invoke(
        "train", "--arch", "test_tiny", "--data", toy["data"], "--out", tmp_path, "--epochs", "1", "--quiet"
    )
    check_refused(result, 2, "directory")


def test_train_never_overwrites_its_data(toy, tmp_path):
    data = make_npz_dataset(tmp_path / "data", n_train=30, n_test=30)
    result, changed = invoke(
        "train",
        "--arch",
        "test_tiny",
        "--data",
        data,
        "--out",
        data / "train.npz",
        "--epochs",
        "1",
        "--force",
        "--quiet",
        root=tmp_path,
    )
    check_refused(result, 2, "input")
    assert changed == []


def test_purify_never_overwrites_its_config(toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = out / "config.yaml"
    cfg.write_text("# my settings\nclean-count: 30\nepochs: 1\nbatch-size: 16\n")
    result, changed = invoke(
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        out,
        "--config",
        cfg,
        "--device",
        "cpu",
        "--force",
        "--quiet",
        root=tmp_path,
    )
    check_refused(result, 2, "input")
    assert changed == []


def test_existing_special_file_is_never_replaced(toy, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    result = invoke(
        "train", "--arch", "test_tiny", "--data", toy["data"], "--out", fifo, "--epochs", "1", "--force", "--quiet"
    )
    is_fifo = fifo.exists() and not fifo.is_file()
    check_refused(result, 2, "regular file")
    assert is_fifo


def _enospc_on(monkeypatch, names: set[str]):
    """Make writes of the temp files behind `names` fail with ENOSPC (a real one: the fd points at /dev/full)."""
    import backdoor_cli.outputs as outputs

    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        if "w" in mode:
            target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if any(target.startswith(f".{n}.") for n in names):
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, fd)
                os.close(full)
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_on_first_output(toy, tmp_path, monkeypatch):
    _enospc_on(monkeypatch, {"purified.safetensors"})
    result, changed = _purify(toy, tmp_path / "out", root=tmp_path)
    check_refused(result, 2, "no space")
    assert changed == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_on_last_output_leaves_no_partial_set(toy, tmp_path, monkeypatch):
    _enospc_on(monkeypatch, {"report.json"})
    result, changed = _purify(toy, tmp_path / "out", root=tmp_path)
    check_refused(result, 2, "no space")
    assert changed == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_train(toy, tmp_path, monkeypatch):
    _enospc_on(monkeypatch, {"model.safetensors"})
    result, changed = invoke(
        "train",
        "--arch",
        "test_tiny",
        "--data",
        toy["data"],
        "--out",
        tmp_path / "model.safetensors",
        "--epochs",
        "1",
        "--quiet",
        root=tmp_path,
    )
    check_refused(result, 2, "no space")
    assert changed == []


def _isolated_mount_script(setup: str, command: list[str], after: str) -> list[str]:
    """Run `command` in a private mount namespace (nothing leaks to the host) between shell `setup` and
    `after`; the shell exits with the command's status."""
    quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in command)
    inner = f"{setup} || exit 99; {quoted}; rc=$?; {after}; exit $rc"
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]


def _can_mount() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
        capture_output=True,
        timeout=20,
    )
    return probe.returncode == 0


@pytest.mark.parametrize("fs", ["full-tmpfs", "read-only-tmpfs"])
def test_real_full_and_read_only_filesystems(toy, tmp_path, fs):
    """A real ENOSPC / EROFS from a tiny tmpfs in a private mount namespace (skipped where mounts are not allowed)."""
    if not _can_mount():
        pytest.skip("needs root with permission to mount a tmpfs in a private namespace (unshare -m)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if fs == "full-tmpfs":
        setup = f"mount -t tmpfs -o size=16k tmpfs {mnt} && (dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null; true)"
    else:
        setup = f"mount -t tmpfs -o ro,size=16k tmpfs {mnt}"
    out = mnt / "model.safetensors"
    code = "import sys; from backdoor_cli.cli import app; sys.argv=['bdclean']+sys.argv[1:]; app()"
    command = [
        sys.executable,
        "-c",
        code,
        "train",
        "--arch",
        "test_tiny",
        "--data",
        str(toy["data"]),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    proc = subprocess.run(
        _isolated_mount_script(setup, command, f"ls -a {mnt} > {tmp_path}/listing.txt"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, proc.stderr
    assert ("no space" if fs == "full-tmpfs" else "cannot write") in proc.stderr.lower()
    # The mount vanished with the namespace; the listing taken inside it shows what was left behind.
    listing = (tmp_path / "listing.txt").read_text().split()
    assert [name for name in listing if name not in (".", "..", "fill")] == [], listing


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu(toy, tmp_path, device):
    result, changed = _purify(toy, tmp_path / "out", "--device", device, root=tmp_path)
    check_refused(result, 2, "no cuda device")
    assert changed == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["tpu", "gpu", "meta", "cuda:x", "cpu:0:1"])
def test_unknown_devices(toy, device):
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--device", device, "--quiet")
    check_refused(result, 2, "device")
