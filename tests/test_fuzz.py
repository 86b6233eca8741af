"""Seeded fuzzing of every reader that takes attacker-controlled bytes.

Each case mutates a valid input (bit flips, truncation, byte insertion/deletion, structured header
and field edits) and calls the library reader directly. The only acceptable outcomes are success or
a BdcleanError subclass (exit 2 or 3 in the CLI); any other exception is a bug (the CLI would print
"internal error" and exit 4), and a payload that runs code is a security hole. The seed is fixed,
so a failure names a case that replays exactly: rerun with the printed case id.

Counts are printed (run with -s to see them) and recorded as junit properties.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import struct
import zipfile
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.config import PurifyOptions, load_config_file, resolve_options
from backdoor_cli.errors import BdcleanError
from backdoor_cli.triggers import build_trigger, load_trigger_spec, parse_trigger_spec

REPO = Path(__file__).resolve().parents[1]
SEED = 20231107
IMAGE_SHAPES = ((12, 12, 3), (28, 28, 1), (32, 32, 3))


# ---------------------------------------------------------------- shared machinery


class Tally:
    """Counts outcomes per category and keeps the first few unexpected exceptions for the message."""

    def __init__(self, name: str, known_bug=None):
        self.name = name
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []
        self.known_bug = known_bug  # predicate on an exception: a bug already pinned by a strict xfail test

    def run(self, case: str, fn) -> object:
        try:
            result = fn()
        except BdcleanError as exc:
            self.outcomes[type(exc).__name__] += 1
            message = str(exc)
            assert message and "Traceback" not in message, f"{case}: empty or traceback message"
            return exc
        except Exception as exc:  # noqa: BLE001 - the point of the test
            if self.known_bug is not None and self.known_bug(exc):
                self.outcomes["KNOWN_BUG"] += 1
                return exc
            self.outcomes["UNEXPECTED"] += 1
            if len(self.failures) < 10:
                self.failures.append(f"{case}: {type(exc).__name__}: {str(exc)[:200]}")
            return exc
        self.outcomes["ok"] += 1
        return result

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def finish(self, record_property) -> None:
        print(f"\n[fuzz] {self.name}: {self.total} cases -> {dict(self.outcomes)}")
        record_property(f"fuzz_{self.name}", json.dumps(dict(self.outcomes)))
        assert not self.failures, "unexpected exceptions (not BdcleanError):\n" + "\n".join(self.failures)


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def insert_bytes(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return data[:i] + junk + data[i:]


def delete_bytes(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16) :]


def interesting_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    i = rng.randrange(len(buf))
    value = rng.choice(
        [
            b"\x00",
            b"\xff",
            b"\x7f",
            b"\x80",
            b"\xff\xff\xff\xff",
            b"\x00\x00\x00\x80",
            b"\xff\xff\xff\xff\xff\xff\xff\x7f",
        ]
    )
    buf[i : i + len(value)] = value
    return bytes(buf)


def splice(rng: random.Random, data: bytes) -> bytes:
    i, j = sorted(rng.randrange(len(data)) for _ in range(2))
    k = rng.randrange(len(data))
    return data[:k] + data[i:j] + data[k:]


BYTE_MUTATORS = (flip_bits, truncate, insert_bytes, delete_bytes, interesting_bytes, splice)


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    mutator = rng.choice(BYTE_MUTATORS)
    return mutator.__name__, mutator(rng, data)


def tiny_state() -> dict[str, torch.Tensor]:
    """A small but realistic state_dict: conv + BN (with its int64 counter) + linear head, mixed dtypes."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "bn.weight": torch.ones(4),
        "bn.bias": torch.zeros(4),
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.ones(4),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(3, 4, generator=g).to(torch.float16),
        "fc.bias": torch.randn(3, generator=g).to(torch.bfloat16),
    }


# ---------------------------------------------------------------- safetensors


def valid_safetensors() -> bytes:
    from safetensors.torch import save

    meta = {
        "schema": "bdclean.checkpoint/1",
        "arch": "test_tiny",
        "num_classes": 3,
        "trigger": {"type": "patch", "target": 0, "size": 3},
    }
    return save(tiny_state(), metadata={"bdclean": json.dumps(meta)})


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


HOSTILE_DTYPES = (
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "U64",
    "C64",
    "X9",
    "",
    "f32",
    5,
    None,
    ["F32"],
)
HOSTILE_SHAPES = ([], [0], [-1], [2**40], [2**63], [1, 2, 3], [3, 4, 5, 6, 7], "abc", [1.5], [None], [2**31, 2**31])


def header_edit(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Structured edits of the JSON header: lying dtypes, shapes, offsets, metadata, length prefix."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    key = rng.choice(names)
    entry = header[key]
    begin, end = entry["data_offsets"]
    kind = rng.randrange(9)
    if kind == 0:
        entry["dtype"] = rng.choice(HOSTILE_DTYPES)
        what = f"dtype={entry['dtype']!r}"
    elif kind == 1:
        entry["shape"] = rng.choice(HOSTILE_SHAPES)
        what = f"shape={entry['shape']!r}"
    elif kind == 2:
        entry["data_offsets"] = rng.choice(
            [
                [0, 0],
                [end, begin],
                [0, 2**63],
                [-1, end],
                [begin, end + 1],
                [begin, len(body) + 64],
                "x",
                [begin],
                [begin + 1, end + 1],
                [0, len(body)],
            ]
        )
        what = f"offsets={entry['data_offsets']!r}"
    elif kind == 3:
        del header[key]
        what = f"drop {key}"
    elif kind == 4:
        header[key + ".extra"] = dict(entry)  # two tensors over the same bytes
        what = "alias"
    elif kind == 5:
        header["__metadata__"] = rng.choice(
            [
                {"bdclean": "not json"},
                {"bdclean": "[1, 2]"},
                {"bdclean": 5},
                "a string",
                [1, 2],
                None,
                {"bdclean": json.dumps({"arch": 7, "num_classes": "x", "normalization": {"mean": "abc"}})},
                {"bdclean": json.dumps({"trigger": {"type": "patch", "image": "/etc/passwd"}})},
                {"bdclean": "{" * 5000 + "}" * 5000},
            ]
        )
        what = f"metadata={str(header['__metadata__'])[:40]}"
    elif kind == 6:
        header[rng.choice(["", "\x00", "a" * 5000, "__metadata__x"])] = entry
        what = "odd key"
    elif kind == 7:
        entry[rng.choice(["extra", "dtype2"])] = 1
        what = "extra field"
    else:
        raw_len = len(json.dumps(header).encode())
        length = rng.choice([0, 1, 7, raw_len - 1, raw_len + 9, len(data), 2**32, 2**63, 2**64 - 1])
        return f"length={length}", join_safetensors(header, body, length)
    return what, join_safetensors(header, body)


def test_fuzz_safetensors_reader(tmp_path, record_property):
    rng = random.Random(SEED)
    valid = valid_safetensors()
    assert read_checkpoint(_write(tmp_path / "valid.safetensors", valid)).format == "safetensors"
    tally = Tally("safetensors")
    for i in range(400):
        if i % 2:
            what, blob = header_edit(rng, valid)
        else:
            what, blob = mutate_bytes(rng, valid)
        path = _write(tmp_path / f"case{i}.safetensors", blob)
        tally.run(f"safetensors case {i} ({what})", partial(read_checkpoint, path))
    tally.finish(record_property)
    assert tally.outcomes["InputError"] > 100  # most mutations must actually be caught, not ignored


# ---------------------------------------------------------------- torch zip (pickle inside)


class _Marker:
    """Pickles as `posix.system('touch MARKER')`: what a hostile checkpoint does on torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rebuild_zip(data: bytes, edit) -> bytes:
    """Rewrite the archive with `edit` applied to data.pkl, so CRCs stay valid and the unpickler sees it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            payload = src.read(info.filename)
            dst.writestr(info.filename, edit(payload) if info.filename.endswith("data.pkl") else payload)
    return out.getvalue()


HOSTILE_GLOBALS = (
    b"posix\nsystem",
    b"os\nsystem",
    b"builtins\neval",
    b"builtins\nexec",
    b"subprocess\nPopen",
    b"torch\nload",
    b"torch._utils\n_rebuild_tensor",
    b"numpy\nload",
    b"__builtin__\ngetattr",
)


def pickle_edit(rng: random.Random, pkl: bytes) -> tuple[str, bytes]:
    kind = rng.randrange(4)
    if kind == 0:  # swap one global for a dangerous one
        target = rng.choice([b"torch._utils\n_rebuild_tensor_v2", b"collections\nOrderedDict", b"torch\nFloatStorage"])
        swap = rng.choice(HOSTILE_GLOBALS)
        return f"global {swap!r}", pkl.replace(target, swap, 1)
    if kind == 1:  # corrupt opcodes / arguments
        return "pkl flip", flip_bits(rng, pkl)
    if kind == 2:
        return "pkl truncate", truncate(rng, pkl)
    return "pkl insert", insert_bytes(rng, pkl)


def test_fuzz_torch_zip_reader(tmp_path, record_property):
    rng = random.Random(SEED + 1)
    marker = tmp_path / "PWNED"
    state = tiny_state()
    seeds = {
        "plain": torch_zip(state),
        "wrapped": torch_zip({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}),
        "hostile": torch_zip({"state_dict": state, "x": _Marker(marker)}),
    }
    assert read_checkpoint(_write(tmp_path / "plain.pt", seeds["plain"])).format == "torch-zip"
    tally = Tally("torch_zip")
    for i in range(300):
        name = rng.choice(list(seeds))
        base = seeds[name]
        if i % 2:
            what, blob = mutate_bytes(rng, base)
        else:
            edits = []
            blob = rebuild_zip(base, lambda pkl, edits=edits: edits.append(pickle_edit(rng, pkl)) or edits[-1][1])
            what = edits[0][0]
        path = _write(tmp_path / f"case{i}.pt", blob)
        outcome = tally.run(f"torch-zip case {i} ({name}, {what})", partial(read_checkpoint, path))
        if name == "hostile" and not isinstance(outcome, BdcleanError):
            # The payload survived the mutation yet the file loaded: only acceptable if the payload is gone.
            assert "x" not in getattr(outcome, "extra_keys", []), f"case {i}: hostile pickle loaded"
    tally.finish(record_property)
    assert not marker.exists(), "a fuzzed checkpoint ran code"
    assert tally.outcomes["UnsafeInputError"] > 20


# ---------------------------------------------------------------- YAML: run configs and trigger specs

VALID_CONFIG = """\
# a run config
data: /nonexistent/data
method: fst
epochs: 3
lr: 0.01
alpha: 0.2
clean-count: 30
device: cpu
seed: 1
mean: [0.5, 0.5, 0.5]
std: 0.25,0.25,0.25
max-asr: 5%
min-acc: 0.5
augment: false
force: false
eval-limit: 100
"""

YAML_TOKENS = (
    "!!python/object/apply:os.system ['touch PWNED']",
    "!!python/name:os.system",
    "!!binary AAAA",
    "&a [1, 2]",
    "*a",
    "*undefined",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "\t",
    "\x00",
    "\xff",
    "\ud800",
    ".inf",
    ".nan",
    "~",
    "yes",
    "1e400",
    "-0x10",
    "99999999999999999999999",
    "'",
    '"',
    "%YAML 1.1\n---",
    "? ",
    "|\n  ",
    "<<: {a: 1}",
    "!!set {a, b}",
    "!!timestamp 2001-12-14",
    "2001-12-14",
    "---\n---",
    "\n  - nested\n",
    "key: value\n" * 3,
    "\\u0000",
    "\r",
    "\u2028",
    "#",
    "!!int x",
    "!!float x",
    "!!bool maybe",
    "!!timestamp x",
    "!!str",
    "!!null",
    "!!python/tuple [1]",
)

HOSTILE_VALUES = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**70,
    -(2**70),
    1e308,
    -1e308,
    math.inf,
    math.nan,
    0.5,
    -0.5,
    "",
    "x" * 300,
    "5%",
    "500%",
    "-5%",
    "nan",
    "cuda:99",
    "cpu",
    "fst",
    "1,2",
    "a,b",
    [],
    [1, 2, 3],
    [[1]],
    {"a": 1},
    ["x"],
    "/dev/zero",
    "\x00",
    3.5,
    "10",
)


# PyYAML's safe constructors raise plain ValueError/KeyError/AttributeError (not YAMLError) for a
# standard tag with a bad value, e.g. `!!int x`, `!!bool maybe`, `!!timestamp x`.
BAD_TAG_VALUES = ("epochs: !!int x\n", "lr: !!float x\n", "augment: !!bool maybe\n", "seed: !!timestamp x\n")


def yaml_tag_bug_present() -> bool:
    """True while the readers still leak PyYAML's non-YAMLError exceptions (pinned by the xfail tests below).
    Once fixed this turns False by itself and the fuzz loops count such cases as plain failures again."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.yaml"
        path.write_text("a: !!timestamp x\n")
        try:
            load_config_file(path)
        except BdcleanError:
            return False
        except Exception:  # noqa: BLE001
            return True
    return False


def _is_yaml_tag_bug(exc: Exception) -> bool:
    return (
        yaml_tag_bug_present()
        and isinstance(exc, (ValueError, KeyError, AttributeError, TypeError))
        and any("yaml" in (frame.filename or "") for frame in __import__("traceback").extract_tb(exc.__traceback__))
    )


@pytest.mark.parametrize("text", BAD_TAG_VALUES)
def test_config_yaml_bad_tag_value_is_a_config_error(tmp_path, text):
    path = _write(tmp_path / "run.yaml", text.encode())
    with pytest.raises(BdcleanError):
        load_config_file(path)


@pytest.mark.parametrize(
    "text",
    [
        "type: patch\nsize: !!int x\n",
        "type: !!timestamp x\n",
        "type: blend\nalpha: !!float x\n",
        "type: patch\nname: !!bool maybe\n",
    ],
)
def test_trigger_yaml_bad_tag_value_is_a_config_error(tmp_path, text):
    path = _write(tmp_path / "t.yaml", text.encode())
    with pytest.raises(BdcleanError):
        load_trigger_spec(str(path))


def mutate_yaml(rng: random.Random, text: str, keys: list[str]) -> tuple[str, bytes]:
    kind = rng.randrange(5)
    if kind == 0:  # raw byte mutations of the text
        return mutate_bytes(rng, text.encode())
    if kind == 1:  # a hostile YAML token somewhere
        token = rng.choice(YAML_TOKENS)
        i = rng.randrange(len(text) + 1)
        return f"token {token!r}", (text[:i] + token + text[i:]).encode("utf-8", "surrogatepass")
    if kind == 2:  # a field given a hostile value (structure kept)
        obj = yaml.safe_load(text)
        key = rng.choice(keys)
        obj[key] = rng.choice(HOSTILE_VALUES)
        return f"{key}={obj[key]!r}"[:60], yaml.safe_dump(obj).encode()
    if kind == 3:  # an unknown or duplicated key
        extra = rng.choice(
            [
                "nosuchkey: 1",
                "config: other.yaml",
                "Epochs: 3",
                "epochs: 4",
                "__class__: x",
                "1: 2",
                "[a]: 1",
                "null: 1",
            ]
        )
        return f"extra {extra!r}", (text + extra + "\n").encode()
    whole = rng.choice(
        [
            b"",
            b"\xef\xbb\xbf" + text.encode(),
            b"- a\n- b\n",
            b"just a string\n",
            b"42\n",
            b"a: " + b"[" * 60 + b"]" * 60 + b"\n",
            b"\xff\xfe" + text.encode("utf-16-le"),
            b"a: &x [1]\nb: [*x, *x]\n",
            text.encode() * 3,
        ]
    )
    return "whole document", whole


def test_fuzz_config_reader(tmp_path, record_property):
    rng = random.Random(SEED + 2)
    path = _write(tmp_path / "run.yaml", VALID_CONFIG.encode())
    assert resolve_options(PurifyOptions, {}, str(path)).epochs == 3
    keys = list(yaml.safe_load(VALID_CONFIG))
    tally = Tally("config_yaml", known_bug=_is_yaml_tag_bug)
    for i in range(250):
        what, blob = mutate_yaml(rng, VALID_CONFIG, keys)
        path = _write(tmp_path / f"case{i}.yaml", blob)
        tally.run(
            f"config case {i} ({what})",
            lambda path=path: (load_config_file(path), resolve_options(PurifyOptions, {}, str(path))),
        )
    tally.finish(record_property)
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def trigger_files(root: Path) -> dict[str, str]:
    """One valid spec per trigger type, with the example pictures copied beside them."""
    for name in ("trigger.png", "mask.png"):
        shutil.copy(REPO / "examples" / "triggers" / name, root / name)
    return {
        "patch": "type: patch\ntarget: 1\nsize: 3\nposition: bottom-right\ncolor: [255, 0, 0]\nname: red\n",
        "patch_image": "type: patch\ntarget: 0\nimage: trigger.png\nposition: [1, 2]\n",
        "blend": "type: blend\ntarget: 0\nalpha: 0.2\npattern: noise\nseed: 3\n",
        "blend_image": "type: blend\ntarget: 2\nalpha: 0.1\nimage: trigger.png\n",
        "sig": "type: sig\ntarget: 0\namplitude: 40\nfrequency: 6\n",
        "wanet": "type: wanet\ntarget: 0\nk: 4\ns: 0.5\nseed: 0\ngrid_rescale: 1\n",
        "image": "type: image\ntarget: 0\nimage: trigger.png\nmask: mask.png\nposition: center\n",
    }


def _load_and_build(path: Path, shape):
    spec = load_trigger_spec(str(path))
    trigger = build_trigger(spec, shape)
    out = trigger.apply(torch.zeros(2, *shape, dtype=torch.uint8))
    assert out.shape == (2, *shape) and out.dtype == torch.uint8
    return trigger


def test_fuzz_trigger_spec_reader(tmp_path, record_property):
    rng = random.Random(SEED + 3)
    specs = trigger_files(tmp_path)
    for name, text in specs.items():  # every base spec is valid for at least the RGB shapes
        _load_and_build(_write(tmp_path / f"{name}.yaml", text.encode()), (32, 32, 3))
    tally = Tally("trigger_yaml", known_bug=_is_yaml_tag_bug)
    for i in range(300):
        name = rng.choice(list(specs))
        text = specs[name]
        what, blob = mutate_yaml(rng, text, list(yaml.safe_load(text)))
        path = _write(tmp_path / f"case{i}.yaml", blob)
        shape = rng.choice(IMAGE_SHAPES)
        tally.run(f"trigger case {i} ({name}, {what}, shape {shape})", partial(_load_and_build, path, shape))
    tally.finish(record_property)
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


TRIGGER_KEYS = (
    "type",
    "target",
    "name",
    "size",
    "position",
    "color",
    "image",
    "image_sha256",
    "alpha",
    "pattern",
    "seed",
    "amplitude",
    "frequency",
    "k",
    "s",
    "grid_rescale",
    "mask",
    "mask_sha256",
    "bogus",
)


def test_fuzz_trigger_spec_fields(tmp_path, record_property):
    """Random mappings straight into parse_trigger_spec + build_trigger (what checkpoint metadata feeds it)."""
    rng = random.Random(SEED + 4)
    trigger_files(tmp_path)
    bad_png = _write(tmp_path / "bad.png", b"\x89PNG\r\n\x1a\n" + bytes(40))
    values = HOSTILE_VALUES + (
        "patch",
        "blend",
        "sig",
        "wanet",
        "image",
        "trigger.png",
        "mask.png",
        str(bad_png),
        "noise",
        "center",
        [0, 0],
        [31, 31],
        [1, 2],
        [255, 0, 0],
        2,
        4,
        255,
        256,
        "0" * 64,
    )
    tally = Tally("trigger_fields")
    for i in range(400):
        obj = {"type": rng.choice(["patch", "blend", "sig", "wanet", "image", "PATCH", 3, None])}
        for key in rng.sample(TRIGGER_KEYS, rng.randint(0, 5)):
            obj[key] = rng.choice(values)
        shape = rng.choice(IMAGE_SHAPES)

        def case(obj=obj, shape=shape):
            spec = parse_trigger_spec(obj, tmp_path, source="fuzz")
            return build_trigger(spec, shape).apply(torch.zeros(1, *shape, dtype=torch.uint8))

        tally.run(f"fields case {i} ({obj!r:.120}, shape {shape})", case)
    tally.finish(record_property)


def test_fuzz_trigger_images(tmp_path, record_property):
    """Corrupted PNG pictures and masks behind valid specs: decoded or refused, never a crash."""
    rng = random.Random(SEED + 5)
    trigger_files(tmp_path)
    good = {name: (tmp_path / name).read_bytes() for name in ("trigger.png", "mask.png")}
    tally = Tally("trigger_images")
    for i in range(100):
        name = rng.choice(list(good))
        what, blob = mutate_bytes(rng, good[name])
        _write(tmp_path / f"m{i}.png", blob)
        other = "mask.png" if name == "trigger.png" else "trigger.png"
        fields = (
            {"trigger.png": f"m{i}.png", "mask.png": other}
            if name == "trigger.png"
            else {"trigger.png": other, "mask.png": f"m{i}.png"}
        )
        spec = _write(
            tmp_path / f"img{i}.yaml",
            f"type: image\nimage: {fields['trigger.png']}\nmask: {fields['mask.png']}\n".encode(),
        )
        tally.run(f"image case {i} ({name}, {what})", partial(_load_and_build, spec, (32, 32, 3)))
    tally.finish(record_property)


# ---------------------------------------------------------------- a few through the CLI


def test_fuzz_cli_inspect(tmp_path, record_property):
    """~20 mutated checkpoints through `bdclean inspect`: exit 0, 2 or 3, short message, no traceback."""
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    rng = random.Random(SEED + 6)
    bases = {
        "st": valid_safetensors(),
        "zip": torch_zip(tiny_state()),
        "hostile": torch_zip({"w": torch.ones(2), "x": _Marker(tmp_path / "PWNED")}),
    }
    codes: Counter = Counter()
    runner = CliRunner()
    for i in range(21):
        kind = ("st", "zip", "hostile")[i % 3]
        what, blob = header_edit(rng, bases[kind]) if kind == "st" and i % 2 else mutate_bytes(rng, bases[kind])
        path = _write(tmp_path / f"cli{i}.bin", blob)
        result = runner.invoke(app, ["inspect", str(path)])
        codes[result.exit_code] += 1
        case = f"cli case {i} ({kind}, {what}): exit {result.exit_code}\n{result.output[-600:]}"
        assert result.exit_code in (0, 2, 3), case
        assert "Traceback" not in result.output, case
        if result.exit_code:
            assert result.stdout == "", case
            assert 1 <= len(result.stderr.strip().splitlines()) <= 3, case
    print(f"\n[fuzz] cli_inspect: {sum(codes.values())} cases -> exit codes {dict(codes)}")
    record_property("fuzz_cli_inspect", json.dumps({str(k): v for k, v in codes.items()}))
    assert not (tmp_path / "PWNED").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
