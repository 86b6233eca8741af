"""Trigger specs: a built-in name or a small YAML mapping, read and checked as hostile input.

A trigger spec is a small YAML mapping (see examples/triggers/) or a built-in name. Specs come from
users, from downloaded files and from checkpoint metadata, so they are treated as hostile: YAML is
read with `yaml.safe_load` only, every field is checked for type and range (booleans are not
numbers), unknown fields are refused, files are size-checked before they are read and image sizes
before they are decoded (assets.py). Every failure is a ConfigError naming the field or the file.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .assets import MAX_IMAGE_SIDE, decode_image, read_bounded, read_image_file
from .values import clip, is_int, is_number, num, show

TRIGGER_TYPES = ("patch", "blend", "sig", "wanet", "image")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")

# Limits on untrusted spec fields (those on image files are in assets.py): they stop specs crafted to
# exhaust memory (huge YAML) before any parsing happens.
MAX_SPEC_BYTES = 64 * 1024
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 100
MAX_TARGET = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_WANET_K = 256

_COMMON_KEYS = ("type", "target", "name")
_TYPE_KEYS = {
    "patch": ("size", "position", "color", "image", "image_sha256"),
    "blend": ("alpha", "pattern", "seed", "image", "image_sha256"),
    "sig": ("amplitude", "frequency"),
    "wanet": ("k", "s", "seed", "grid_rescale"),
    "image": ("image", "mask", "position", "image_sha256", "mask_sha256"),
}

_MISSING = object()

# The FST paper's attack settings (Min et al. 2023), all-to-one with target class 0.
BUILTIN_TRIGGERS: dict[str, dict[str, Any]] = {
    "badnets": {"type": "patch", "target": 0, "size": 3, "position": "bottom-right", "color": 255},
    # The paper blends the Hello Kitty picture, which we cannot ship; seeded uniform noise at the
    # same alpha is the usual stand-in. A picture can be given with `type: blend, image: file.png`.
    "blended": {"type": "blend", "target": 0, "alpha": 0.2, "pattern": "noise", "seed": 0},
    "sig": {"type": "sig", "target": 0, "amplitude": 40.0, "frequency": 6.0},
    "wanet": {"type": "wanet", "target": 0, "k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0},
}


@dataclass(frozen=True)
class TriggerSpec:
    """A validated trigger spec. `params` holds every field but type/target, defaults filled in;
    image paths are absolute and come with their sha256. `source` is the file or built-in name.
    Change the target with `dataclasses.replace(spec, target=t)`."""

    type: str
    target: int
    params: dict
    source: str


# ---------------------------------------------------------------- reading specs


def load_trigger_spec(text_or_path: str) -> TriggerSpec:
    """A built-in name (badnets, blended, sig, wanet) or the path of a YAML spec file."""
    text = os.fspath(text_or_path) if isinstance(text_or_path, os.PathLike) else text_or_path
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--trigger is empty", hint=_trigger_hint())
    # Built-in names win over same-named files, so a stray file cannot change what `badnets` means.
    if text in BUILTIN_TRIGGERS:
        return parse_trigger_spec(dict(BUILTIN_TRIGGERS[text]), None, source=text)
    path = Path(text)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a NUL byte or an over-long name
        exists = False
    if not exists:
        raise ConfigError(f"trigger {show(text)} is neither a built-in name nor an existing file", hint=_trigger_hint())
    data = read_bounded(path, MAX_SPEC_BYTES, f"trigger spec {path}")
    try:
        doc = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"trigger spec {path}: not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        obj = yaml.safe_load(doc)
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"trigger spec {path}: invalid YAML{where}: {clip(str(what))}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"trigger spec {path}: invalid YAML: {clip(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"trigger spec {path}: YAML nested too deeply") from None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as e:
        # safe_load's constructors raise these (not YAMLError) for standard tags with bad values: !!int x
        raise ConfigError(f"trigger spec {path}: invalid YAML value ({clip(str(e) or type(e).__name__)})") from None
    if obj is None:
        raise ConfigError(f"trigger spec {path}: the file is empty", hint=_trigger_hint())
    return parse_trigger_spec(obj, path.parent, source=str(path))


def parse_trigger_spec(obj: dict, base_dir: Path | None, source: str) -> TriggerSpec:
    """Validate a spec mapping strictly; relative image paths resolve against `base_dir` (else cwd)."""
    if not isinstance(obj, dict):
        raise ConfigError(
            f"trigger spec {source}: expected a mapping of fields (type: patch, ...), got {type(obj).__name__}",
            hint=_trigger_hint(),
        )
    for key in obj:
        if not isinstance(key, str):
            raise ConfigError(f"trigger spec {source}: field names must be text, got {show(key)}")
    if "type" not in obj:
        raise ConfigError(f"trigger spec {source}: missing field 'type'", hint=f"one of: {', '.join(TRIGGER_TYPES)}")
    kind = obj["type"]
    if not isinstance(kind, str) or kind not in TRIGGER_TYPES:
        raise ConfigError(
            f"trigger spec {source}: field 'type' must be one of {', '.join(TRIGGER_TYPES)}, got {show(kind)}"
        )
    allowed = _COMMON_KEYS + _TYPE_KEYS[kind]
    for key in obj:
        if key not in allowed:
            raise ConfigError(
                f"trigger spec {source}: unknown field {show(key)} for type {kind}",
                hint=f"allowed fields: {', '.join(allowed)}",
            )
    fields = _Fields(obj, source, base_dir)
    target = fields.integer("target", 0, 0, MAX_TARGET)
    params: dict[str, Any] = {}
    if "name" in obj:
        params["name"] = fields.name("name")
    params.update(_PARSERS[kind](fields))
    return TriggerSpec(type=kind, target=target, params=params, source=str(source))


class _Fields:
    """Typed, range-checked access to the fields of one spec; errors name the field."""

    def __init__(self, obj: dict, source: str, base_dir: Path | None):
        self.obj, self.source, self.base_dir = obj, source, base_dir

    def fail(self, key: str, expected: str, value: Any = _MISSING, hint: str | None = None):
        got = "" if value is _MISSING else f", got {show(value)}"
        raise ConfigError(f"trigger spec {self.source}: field '{key}' must be {expected}{got}", hint=hint)

    def refuse(self, message: str, hint: str | None = None):
        raise ConfigError(f"trigger spec {self.source}: {message}", hint=hint)

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.obj.get(key, default)
        if not is_int(value) or not lo <= value <= hi:
            self.fail(key, f"an integer in [{lo}, {hi}]", value)
        return int(value)

    def number(self, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.obj.get(key, default)
        ok = is_number(value) and math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            bounds = f"{'(' if lo_open else '['}{num(lo)}, {num(hi)}]" if math.isfinite(hi) else f"> {num(lo)}"
            self.fail(key, f"a number {'in ' if math.isfinite(hi) else ''}{bounds}", value)
        return float(value)

    def seed(self, key: str) -> int:
        return self.integer(key, 0, 0, MAX_SEED)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.obj.get(key, default)
        if not isinstance(value, str) or value not in choices:
            self.fail(key, f"one of {', '.join(choices)}", value)
        return value

    def name(self, key: str) -> str:
        value = self.obj[key]
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
            self.fail(key, f"printable text of 1..{MAX_NAME_CHARS} characters", value)
        return value

    def position(self, key: str) -> str | list[int]:
        value = self.obj.get(key, "bottom-right")
        if isinstance(value, str):
            if value not in POSITIONS:
                self.fail(key, f"one of {', '.join(POSITIONS)} or [row, col]", value)
            return value
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(is_int(v) and 0 <= v <= MAX_IMAGE_SIDE for v in value)
        ):
            return [int(value[0]), int(value[1])]
        self.fail(key, f"one of {', '.join(POSITIONS)} or [row, col] with integers in [0, {MAX_IMAGE_SIDE}]", value)

    def color(self, key: str) -> int | list[int]:
        value = self.obj.get(key, 255)
        if is_int(value) and 0 <= value <= 255:
            return int(value)
        if (
            isinstance(value, (list, tuple))
            and 1 <= len(value) <= 4
            and all(is_int(v) and 0 <= v <= 255 for v in value)
        ):
            return [int(v) for v in value]
        self.fail(key, "an integer in [0, 255] or a list of one per channel", value)

    def image_file(self, key: str) -> tuple[str, str]:
        """Check an image field: resolve, read (bounded), hash, decode once; return (path, sha256)."""
        raw = self.obj[key]
        if not isinstance(raw, str) or not 0 < len(raw) <= MAX_PATH_CHARS or "\x00" in raw:
            self.fail(key, "the path of an image file", raw)
        path = Path(raw)
        if not path.is_absolute():
            path = (self.base_dir if self.base_dir is not None else Path.cwd()) / path
        try:
            path = path.resolve()
        except (OSError, RuntimeError) as e:
            self.refuse(f"{key} file {raw}: cannot resolve the path ({e})")
        what = f"trigger spec {self.source}: {key} file {path}"
        data = read_image_file(path, what)
        digest = hashlib.sha256(data).hexdigest()
        sha_key = f"{key}_sha256"
        if sha_key in self.obj:
            expected = self.obj[sha_key]
            if not isinstance(expected, str) or len(expected) != 64 or set(expected) - set("0123456789abcdef"):
                self.fail(sha_key, "a sha256 hex digest (64 lowercase hex digits)", expected)
            if expected != digest:
                self.refuse(
                    f"{key} file {path} has sha256 {digest[:12]}..., the spec expects {expected[:12]}...",
                    hint="the file changed since the spec was written; restore it or drop the hash",
                )
        decode_image(data, what)
        return str(path), digest

    def reject_with(self, present: str, *others: str, reason: str) -> None:
        for other in others:
            if other in self.obj:
                self.refuse(f"field '{other}' cannot be used with '{present}': {reason}")


def _parse_patch(f: _Fields) -> dict:
    if "image" in f.obj:
        f.reject_with("image", "size", "color", reason="the patch picture is used at its own size and colours")
        path, digest = f.image_file("image")
        return {"image": path, "image_sha256": digest, "position": f.position("position")}
    f.reject_with("size", "image_sha256", reason="image_sha256 belongs to an image file")
    return {
        "size": f.integer("size", 3, 1, MAX_IMAGE_SIDE),
        "position": f.position("position"),
        "color": f.color("color"),
    }


def _parse_blend(f: _Fields) -> dict:
    alpha = f.number("alpha", 0.2, 0.0, 1.0)
    if "image" in f.obj:
        f.reject_with("image", "pattern", "seed", reason="give either an image or a generated pattern")
        path, digest = f.image_file("image")
        return {"alpha": alpha, "image": path, "image_sha256": digest}
    f.reject_with("pattern", "image_sha256", reason="image_sha256 belongs to an image file")
    return {"alpha": alpha, "pattern": f.choice("pattern", "noise", ("noise",)), "seed": f.seed("seed")}


def _parse_sig(f: _Fields) -> dict:
    return {
        "amplitude": f.number("amplitude", 40.0, 0.0, 255.0, lo_open=True),
        "frequency": f.number("frequency", 6.0, 0.0, math.inf, lo_open=True),
    }


def _parse_wanet(f: _Fields) -> dict:
    return {
        "k": f.integer("k", 4, 2, MAX_WANET_K),
        "s": f.number("s", 0.5, 0.0, math.inf, lo_open=True),
        "seed": f.seed("seed"),
        "grid_rescale": f.number("grid_rescale", 1.0, 0.0, math.inf, lo_open=True),
    }


def _parse_image(f: _Fields) -> dict:
    for key in ("image", "mask"):
        if key not in f.obj:
            f.refuse(f"type image needs field '{key}'", hint="image: trigger.png and mask: mask.png (grayscale)")
    image, image_sha = f.image_file("image")
    mask, mask_sha = f.image_file("mask")
    return {
        "image": image,
        "image_sha256": image_sha,
        "mask": mask,
        "mask_sha256": mask_sha,
        "position": f.position("position"),
    }


_PARSERS = {
    "patch": _parse_patch,
    "blend": _parse_blend,
    "sig": _parse_sig,
    "wanet": _parse_wanet,
    "image": _parse_image,
}


def _trigger_hint() -> str:
    return f"a built-in ({', '.join(BUILTIN_TRIGGERS)}) or a YAML spec file such as examples/triggers/badnets.yaml"
