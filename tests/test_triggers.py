"""Trigger specs, their validation, and the batched transforms they build (tiny tensors, CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from backdoor_cli.errors import ConfigError, InputError
from backdoor_cli.triggers import (
    BUILTIN_TRIGGERS,
    build_trigger,
    load_trigger_spec,
    make_poisoned_eval_set,
    parse_trigger_spec,
    poison_training_set,
)
from backdoor_cli.triggers import apply as trigger_apply
from backdoor_cli.triggers import assets as trigger_assets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "triggers"


def make(obj: dict, shape=(8, 8, 3), base_dir: Path | None = None):
    return build_trigger(parse_trigger_spec(obj, base_dir, source="test"), shape)


def batch(shape=(8, 8, 3), n=2, value=None, seed=0) -> torch.Tensor:
    if value is not None:
        return torch.full((n, *shape), value, dtype=torch.uint8)
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array.astype(np.uint8), mode).save(path)
    return path


# ---------------------------------------------------------------- patch


def test_badnets_builtin_is_a_white_3x3_square_bottom_right():
    trigger = build_trigger(load_trigger_spec("badnets"), (8, 8, 3))
    x = batch(value=0)
    out = trigger.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert (out[:, 5:, 5:, :] == 255).all()
    out[:, 5:, 5:, :] = 0
    assert (out == 0).all()
    assert (x == 0).all()  # the input is untouched
    assert trigger.target == 0 and trigger.spec.source == "badnets"


@pytest.mark.parametrize(
    "position, origin",
    [
        ("top-left", (0, 0)),
        ("top-right", (0, 6)),
        ("bottom-left", (5, 0)),
        ("bottom-right", (5, 6)),
        ("center", (2, 3)),
        ([2, 4], (2, 4)),
    ],
)
def test_patch_positions(position, origin):
    trigger = make({"type": "patch", "size": 3, "position": position, "color": 200}, shape=(8, 9, 1))
    out = trigger.apply(batch((8, 9, 1), value=7))
    expected = torch.full((2, 8, 9, 1), 7, dtype=torch.uint8)
    r, c = origin
    expected[:, r : r + 3, c : c + 3] = 200
    assert torch.equal(out, expected)


def test_patch_per_channel_color_and_other_pixels_exact():
    x = batch()
    out = make({"type": "patch", "size": 2, "position": "top-left", "color": [10, 20, 30]}).apply(x)
    assert out[:, :2, :2].reshape(-1, 3).tolist() == [[10, 20, 30]] * 8
    assert torch.equal(out[:, 2:], x[:, 2:]) and torch.equal(out[:, :, 2:], x[:, :, 2:])


def test_patch_from_image_file_uses_its_own_size(tmp_path):
    picture = np.arange(2 * 3 * 3).reshape(2, 3, 3) * 9
    save_png(tmp_path / "p.png", picture)
    trigger = make({"type": "patch", "image": "p.png", "position": [1, 2]}, base_dir=tmp_path)
    out = trigger.apply(batch(value=0))
    assert torch.equal(out[0, 1:3, 2:5], torch.from_numpy(picture.astype(np.uint8)))
    assert out.sum() == out[:, 1:3, 2:5].sum()


def test_patch_color_list_must_match_channels():
    with pytest.raises(ConfigError, match="'color' has 3 values but the images have 1"):
        make({"type": "patch", "color": [1, 2, 3]}, shape=(8, 8, 1))


def test_patch_larger_than_image_or_outside_is_refused():
    with pytest.raises(ConfigError, match="larger than the 8x8 images"):
        make({"type": "patch", "size": 9})
    with pytest.raises(ConfigError, match="'position'.*outside"):
        make({"type": "patch", "size": 3, "position": [6, 0]})


def test_grayscale_badnets():
    out = build_trigger(load_trigger_spec("badnets"), (28, 28, 1)).apply(batch((28, 28, 1), value=0))
    assert out.shape == (2, 28, 28, 1) and int(out.sum()) == 2 * 9 * 255


# ---------------------------------------------------------------- blend


def test_blend_image_formula(tmp_path):
    save_png(tmp_path / "b.png", np.full((8, 8, 3), 200))
    out = make({"type": "blend", "image": str(tmp_path / "b.png"), "alpha": 0.25}).apply(batch(value=100))
    assert (out == 125).all()  # 0.75 * 100 + 0.25 * 200


def test_blend_image_is_resized_to_the_images(tmp_path):
    save_png(tmp_path / "small.png", np.full((2, 3, 3), 40))
    out = make({"type": "blend", "image": "small.png", "alpha": 1.0}, shape=(6, 5, 3), base_dir=tmp_path).apply(
        batch((6, 5, 3))
    )
    assert (out == 40).all()


def test_blend_noise_is_seeded_and_rounds_half_to_even():
    spec = {"type": "blend", "pattern": "noise", "seed": 3, "alpha": 0.5}
    a, b = make(spec), make(spec)
    assert torch.equal(a.state()["offset"], b.state()["offset"])
    assert not torch.equal(a.state()["offset"], make({**spec, "seed": 4}).state()["offset"])
    x = batch(seed=1)
    expected = (x.double() * 0.5 + a.state()["offset"].double()).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(a.apply(x), expected)  # float64 reference: x/2 + p/2 is exact in float32 too
    assert load_trigger_spec("blended").params == {"alpha": 0.2, "pattern": "noise", "seed": 0}


def test_blend_alpha_zero_is_identity():
    x = batch(seed=2)
    assert torch.equal(make({"type": "blend", "alpha": 0}).apply(x), x)


# ---------------------------------------------------------------- sig


def test_sig_values_and_clipping():
    trigger = make({"type": "sig", "amplitude": 40, "frequency": 6}, shape=(3, 24, 1))
    row = trigger.apply(batch((3, 24, 1), value=100))[0, :, :, 0]
    assert row[0, :4].tolist() == [100, 140, 100, 60]  # sin(pi j / 2) * 40
    assert (row == row[0]).all()  # the same for every row
    high = trigger.apply(batch((3, 24, 1), value=250))[0, 0, :4, 0].tolist()
    assert high == [250, 255, 250, 210]


def test_sig_builtin_rgb_all_channels_equal_shift():
    trigger = build_trigger(load_trigger_spec("sig"), (4, 32, 3))
    out = trigger.apply(batch((4, 32, 3), value=128)).int()
    expected = [round(128 + 40 * math.sin(2 * math.pi * j * 6 / 32)) for j in range(32)]
    assert out[0, 0, :, 0].tolist() == expected
    assert (out == out[:, :, :, :1]).all()


# ---------------------------------------------------------------- wanet


def test_wanet_grid_reproducible_and_seeded():
    spec = {"type": "wanet", "k": 4, "s": 0.5, "seed": 0}
    grid = make(spec, shape=(32, 32, 3)).state()["grid"]
    assert grid.shape == (1, 32, 32, 2) and grid.dtype == torch.float32
    assert grid.abs().max() <= 1
    assert torch.equal(grid, make(spec, shape=(32, 32, 3)).state()["grid"])
    assert not torch.equal(grid, make({**spec, "seed": 1}, shape=(32, 32, 3)).state()["grid"])


def test_wanet_tiny_strength_is_identity_on_a_non_square_image():
    # Checks the identity grid's axes: x runs along the width, y along the height.
    x = batch((5, 7, 3), n=3)
    assert torch.equal(make({"type": "wanet", "s": 1e-9}, shape=(5, 7, 3)).apply(x), x)


def test_wanet_matches_grid_sample_and_keeps_constant_images():
    trigger = make({"type": "wanet", "k": 3, "s": 2.0, "seed": 5}, shape=(8, 8, 3))
    x = batch(seed=4)
    ref = (
        F.grid_sample(x.permute(0, 3, 1, 2).float(), trigger.state()["grid"].repeat(2, 1, 1, 1), align_corners=True)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
    )
    out = trigger.apply(x)
    assert torch.equal(out, ref) and not torch.equal(out, x)
    assert (trigger.apply(batch(value=77)) == 77).all()


def test_wanet_builtin_grayscale():
    out = build_trigger(load_trigger_spec("wanet"), (28, 28, 1)).apply(batch((28, 28, 1)))
    assert out.shape == (2, 28, 28, 1) and out.dtype == torch.uint8


# ---------------------------------------------------------------- image + mask


def test_image_with_mask_placed_and_blended(tmp_path):
    save_png(tmp_path / "t.png", np.full((2, 2, 3), 200))
    save_png(tmp_path / "m.png", np.array([[255, 0], [128, 255]]), "L")
    trigger = make(
        {"type": "image", "image": "t.png", "mask": "m.png", "position": "top-left"}, shape=(4, 4, 3), base_dir=tmp_path
    )
    out = trigger.apply(batch((4, 4, 3), value=100))[0, :, :, 0]
    assert out[0, :2].tolist() == [200, 100]
    assert out[1, :2].tolist() == [150, 200]  # 100 + 128/255 * 100 = 150.2 -> 150
    assert (out[2:] == 100).all() and (out[:, 2:] == 100).all()


def test_image_same_size_as_data_covers_it_grayscale(tmp_path):
    save_png(tmp_path / "t.png", np.full((3, 3, 3), 90))
    save_png(tmp_path / "m.png", np.full((3, 3, 3), 255))  # an RGB mask becomes grayscale
    out = make({"type": "image", "image": "t.png", "mask": "m.png"}, shape=(3, 3, 1), base_dir=tmp_path).apply(
        batch((3, 3, 1))
    )
    assert (out == 90).all()


def test_image_mask_size_mismatch_and_missing_mask(tmp_path):
    save_png(tmp_path / "t.png", np.zeros((2, 2, 3)))
    save_png(tmp_path / "m.png", np.zeros((3, 3)), "L")
    with pytest.raises(ConfigError, match="mask must have the image's size|but mask is 3x3"):
        make({"type": "image", "image": "t.png", "mask": "m.png"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs field 'mask'"):
        make({"type": "image", "image": "t.png"}, base_dir=tmp_path)


# ---------------------------------------------------------------- validation

BAD_SPECS = [
    ({"target": 0}, "missing field 'type'"),
    ({"type": "laser"}, "'type' must be one of"),
    ({"type": ["patch"]}, "'type' must be one of"),
    ({"type": "patch", "sise": 3}, "unknown field 'sise' for type patch"),
    ({"type": "sig", "alpha": 0.2}, "unknown field 'alpha' for type sig"),
    ({"type": "patch", "size": True}, "'size' must be an integer"),
    ({"type": "patch", "size": 0}, "'size' must be an integer in \\[1, 4096\\]"),
    ({"type": "patch", "size": 2.5}, "'size' must be an integer"),
    ({"type": "patch", "size": "3"}, "'size' must be an integer"),
    ({"type": "patch", "position": "middle"}, "'position' must be one of"),
    ({"type": "patch", "position": [1]}, "'position'"),
    ({"type": "patch", "position": [-1, 2]}, "'position'"),
    ({"type": "patch", "position": [True, 2]}, "'position'"),
    ({"type": "patch", "color": 256}, "'color'"),
    ({"type": "patch", "color": [1, 2, "x"]}, "'color'"),
    ({"type": "patch", "color": [1, 2, 3, 4, 5]}, "'color'"),
    ({"type": "patch", "target": -1}, "'target' must be an integer"),
    ({"type": "patch", "target": True}, "'target' must be an integer"),
    ({"type": "patch", "target": 1.0}, "'target' must be an integer"),
    ({"type": "patch", "name": 5}, "'name' must be printable text"),
    ({"type": "patch", "name": "a\nb"}, "'name' must be printable text"),
    ({"type": "blend", "alpha": 1.5}, "'alpha' must be a number in \\[0, 1\\], got 1.5"),
    ({"type": "blend", "alpha": "0.2"}, "'alpha' must be a number"),
    ({"type": "blend", "alpha": float("nan")}, "'alpha' must be a number"),
    ({"type": "blend", "alpha": True}, "'alpha' must be a number"),
    ({"type": "blend", "alpha": None}, "'alpha' must be a number in \\[0, 1\\], got None"),
    ({"type": "blend", "pattern": "stripes"}, "'pattern' must be one of noise"),
    ({"type": "blend", "seed": -1}, "'seed' must be an integer"),
    ({"type": "blend", "image_sha256": "0" * 64}, "'image_sha256' cannot be used"),
    ({"type": "sig", "amplitude": 0}, "'amplitude' must be a number in \\(0, 255\\]"),
    ({"type": "sig", "amplitude": 300}, "'amplitude'"),
    ({"type": "sig", "frequency": -1}, "'frequency' must be a number > 0"),
    ({"type": "sig", "frequency": float("inf")}, "'frequency'"),
    ({"type": "wanet", "k": 1}, "'k' must be an integer in \\[2, 256\\]"),
    ({"type": "wanet", "k": True}, "'k'"),
    ({"type": "wanet", "k": 10**9}, "'k'"),
    ({"type": "wanet", "s": 0}, "'s' must be a number > 0"),
    ({"type": "wanet", "grid_rescale": -1}, "'grid_rescale'"),
    ({"type": "image", "image": 3, "mask": "m.png"}, "'image' must be the path of an image file"),
    ({"type": "patch", 1: 2}, "field names must be text"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_fields_are_config_errors_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_trigger_spec(spec, None, source="bad.yaml")


def test_non_mapping_spec():
    for obj in (["type", "patch"], "patch", 3, None):
        with pytest.raises(ConfigError, match="expected a mapping"):
            parse_trigger_spec(obj, None, source="x")


def test_conflicting_fields(tmp_path):
    save_png(tmp_path / "p.png", np.zeros((2, 2, 3)))
    with pytest.raises(ConfigError, match="'size' cannot be used with 'image'"):
        parse_trigger_spec({"type": "patch", "image": "p.png", "size": 3}, tmp_path, "x")
    with pytest.raises(ConfigError, match="'pattern' cannot be used with 'image'"):
        parse_trigger_spec({"type": "blend", "image": "p.png", "pattern": "noise"}, tmp_path, "x")
    with pytest.raises(ConfigError, match="'seed' cannot be used with 'image'"):
        parse_trigger_spec({"type": "blend", "image": "p.png", "seed": 1}, tmp_path, "x")


def test_huge_hostile_values_give_short_messages():
    nested = [1] * 4
    for _ in range(12):  # what YAML aliases can build cheaply: 4**12 leaves if fully expanded
        nested = [nested] * 4
    with pytest.raises(ConfigError) as info:
        parse_trigger_spec({"type": "patch", "position": nested}, None, "x")
    assert len(str(info.value)) < 300


# ---------------------------------------------------------------- image files


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"image file .*nope\.png: file not found"):
        parse_trigger_spec({"type": "blend", "image": "nope.png"}, tmp_path, "x")


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ConfigError, match=r"bad\.png: not a readable image"):
        parse_trigger_spec({"type": "blend", "image": "bad.png"}, tmp_path, "x")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ConfigError, match=r"text\.png: not a readable image"):
        parse_trigger_spec({"type": "patch", "image": "text.png"}, tmp_path, "x")


def test_truncated_png_is_refused(tmp_path):
    save_png(tmp_path / "ok.png", np.random.default_rng(0).integers(0, 256, (16, 16, 3)))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cut.png: not a readable image"):
        parse_trigger_spec({"type": "blend", "image": "cut.png"}, tmp_path, "x")


def test_unsupported_format_is_refused(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "t.tiff")
    with pytest.raises(ConfigError, match="t.tiff: not a readable image"):
        parse_trigger_spec({"type": "blend", "image": "t.tiff"}, tmp_path, "x")


def test_directory_as_image_is_refused(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ConfigError, match="d.png: not a regular file"):
        parse_trigger_spec({"type": "blend", "image": "d.png"}, tmp_path, "x")


def test_oversized_image_dimensions_refused_before_decoding(tmp_path):
    Image.new("L", (4097, 1)).save(tmp_path / "wide.png")  # a few hundred bytes on disk
    with pytest.raises(ConfigError, match="wide.png: image is 4097x1 pixels, limit 4096x4096"):
        parse_trigger_spec({"type": "blend", "image": "wide.png"}, tmp_path, "x")


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px: over MAX, under 2 * MAX -> only a warning
    with pytest.raises(ConfigError, match="bomb.png: image has too many pixels"):
        parse_trigger_spec({"type": "blend", "image": "bomb.png"}, tmp_path, "x")


def test_oversized_image_file_refused_before_reading(tmp_path, monkeypatch):
    save_png(tmp_path / "big.png", np.zeros((8, 8, 3)))
    monkeypatch.setattr(trigger_assets, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ConfigError, match="big.png: file too large"):
        parse_trigger_spec({"type": "blend", "image": "big.png"}, tmp_path, "x")


def test_sha256_is_checked(tmp_path):
    save_png(tmp_path / "p.png", np.zeros((2, 2, 3)))
    spec = parse_trigger_spec({"type": "patch", "image": "p.png"}, tmp_path, "x")
    digest = spec.params["image_sha256"]
    assert len(digest) == 64
    with pytest.raises(ConfigError, match="the spec expects"):
        parse_trigger_spec({"type": "patch", "image": "p.png", "image_sha256": "0" * 64}, tmp_path, "x")
    with pytest.raises(ConfigError, match="'image_sha256' must be a sha256"):
        parse_trigger_spec({"type": "patch", "image": "p.png", "image_sha256": "abc"}, tmp_path, "x")
    # The file changing between parsing and building is caught too.
    save_png(tmp_path / "p.png", np.ones((2, 2, 3)))
    with pytest.raises(ConfigError, match="changed since the trigger spec was read"):
        build_trigger(spec, (8, 8, 3))


# ---------------------------------------------------------------- YAML files


def test_yaml_relative_image_resolves_against_yaml_dir(tmp_path, monkeypatch):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    save_png(spec_dir / "t.png", np.full((2, 2, 3), 9))
    save_png(spec_dir / "m.png", np.full((2, 2), 255), "L")
    (spec_dir / "s.yaml").write_text("type: image\ntarget: 2\nimage: t.png\nmask: m.png\n")
    monkeypatch.chdir(tmp_path)  # a different working directory
    spec = load_trigger_spec("specs/s.yaml")
    assert spec.target == 2 and spec.params["image"] == str((spec_dir / "t.png").resolve())
    assert spec.source == "specs/s.yaml"


def test_yaml_errors(tmp_path):
    cases = {
        "latin1.yaml": ("type: patch\nname: caf\xe9\n".encode("latin-1"), "not UTF-8"),
        "syntax.yaml": (b"type: patch\nsize: [1, 2\n", "invalid YAML"),
        "list.yaml": (b"- type: patch\n", "expected a mapping"),
        "scalar.yaml": (b"badnets\n", "expected a mapping"),
        "empty.yaml": (b"# nothing\n", "the file is empty"),
        "multi.yaml": (b"type: patch\n---\ntype: sig\n", "invalid YAML"),
        "deep.yaml": (b"type: patch\ncolor: " + b"[" * 20000 + b"]" * 20000 + b"\n", "YAML"),
        "pyobj.yaml": (b"type: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n", "invalid YAML"),
        "pyname.yaml": (b"type: patch\nsize: !!python/name:builtins.print\n", "invalid YAML"),
        "date.yaml": (b"type: blend\nalpha: 2001-12-14\n", "'alpha' must be a number"),
        "binary.yaml": (b"type: patch\nname: !!binary aGVsbG8=\n", "'name' must be printable text"),
        "intkey.yaml": (b"type: patch\n3: 4\n", "field names must be text"),
        "laughs.yaml": (
            b"type: patch\nposition: &a [[1, 2], [1, 2]]\ncolor: &b [*a, *a, *a, *a]\nname: &c [*b, *b, *b, *b]\n",
            "'name' must be printable",
        ),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=message) as info:
            load_trigger_spec(str(tmp_path / name))
        assert name in str(info.value)
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "s.yaml").write_text("type: patch\nsize: 3\n  bad: indent\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_trigger_spec(str(tmp_path / "s.yaml"))


def test_yaml_too_large(tmp_path):
    (tmp_path / "big.yaml").write_text("type: patch\n" + "# pad\n" * 20000)
    with pytest.raises(ConfigError, match="file too large"):
        load_trigger_spec(str(tmp_path / "big.yaml"))


def test_unknown_name_or_missing_file():
    with pytest.raises(ConfigError, match="neither a built-in name nor an existing file") as info:
        load_trigger_spec("badnet")
    assert "badnets, blended, sig, wanet" in info.value.hint
    with pytest.raises(ConfigError, match="empty"):
        load_trigger_spec("")
    with pytest.raises(ConfigError, match="neither"):
        load_trigger_spec("a\x00b")


# ---------------------------------------------------------------- built-ins, examples, round trip


def test_builtins_have_the_papers_settings():
    assert BUILTIN_TRIGGERS["badnets"]["size"] == 3
    assert load_trigger_spec("blended").params["alpha"] == 0.2
    assert load_trigger_spec("sig").params == {"amplitude": 40.0, "frequency": 6.0}
    assert load_trigger_spec("wanet").params == {"k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0}


def example_files():
    return sorted(EXAMPLES.glob("*.yaml"))


def test_examples_exist_with_a_command_in_the_header():
    names = {p.name for p in example_files()}
    assert {"badnets.yaml", "blended.yaml", "sig.yaml", "wanet.yaml", "patch_custom.yaml", "image_mask.yaml"} <= names
    for path in example_files():
        header = path.read_text().split("\ntype:")[0]
        assert f"--trigger examples/triggers/{path.name}" in header, path.name
    for png in ("trigger.png", "mask.png"):
        assert (EXAMPLES / png).stat().st_size < 1000


@pytest.mark.parametrize("name", ["badnets", "blended", "sig", "wanet"])
def test_builtin_examples_equal_the_builtins(name):
    assert load_trigger_spec(str(EXAMPLES / f"{name}.yaml")).params == load_trigger_spec(name).params


@pytest.mark.parametrize("source", ["badnets", "blended", "sig", "wanet", "patch_custom", "image_mask"])
def test_round_trip_through_to_dict_json_and_yaml(source):
    spec = load_trigger_spec(source if source in BUILTIN_TRIGGERS else str(EXAMPLES / f"{source}.yaml"))
    trigger = build_trigger(spec, (16, 16, 3))
    as_json = json.loads(json.dumps(trigger.to_dict()))
    as_yaml = yaml.safe_load(yaml.safe_dump(trigger.to_dict()))
    x = batch((16, 16, 3), n=3)
    for obj in (as_json, as_yaml):
        again = parse_trigger_spec(obj, None, source="checkpoint metadata")
        assert again.type == spec.type and again.target == spec.target and again.params == spec.params
        assert torch.equal(build_trigger(again, (16, 16, 3)).apply(x), trigger.apply(x))


def test_image_mask_example_works_for_rgb_and_grayscale():
    spec = load_trigger_spec(str(EXAMPLES / "image_mask.yaml"))
    for shape in ((32, 32, 3), (28, 28, 1)):
        x = batch(shape, value=0)
        out = build_trigger(spec, shape).apply(x)
        changed = (out != 0).any(-1)[0]
        rows, cols = changed.nonzero().T
        assert rows.min() >= shape[0] - 6 and cols.min() >= shape[1] - 6 and len(rows) > 10


def test_target_override_and_name():
    spec = load_trigger_spec(str(EXAMPLES / "patch_custom.yaml"))
    assert spec.target == 3 and spec.params["name"] == "yellow square"
    trigger = build_trigger(dataclasses.replace(spec, target=7), (8, 8, 3))
    assert trigger.target == 7 and trigger.to_dict()["target"] == 7


# ---------------------------------------------------------------- apply() contract


def test_apply_refuses_wrong_dtype_or_shape():
    trigger = build_trigger(load_trigger_spec("badnets"), (8, 8, 3))
    with pytest.raises(InputError, match="uint8 images shaped \\(N, 8, 8, 3\\)"):
        trigger.apply(batch().float())
    with pytest.raises(InputError, match="got torch.uint8 \\(2, 8, 8, 1\\)"):
        trigger.apply(batch((8, 8, 1)))


def test_build_refuses_bad_image_shapes():
    for shape in ((8, 8), (8, 8, 2), (0, 8, 3), (8.0, 8, 3)):
        with pytest.raises(InputError, match="C = 1 or 3"):
            build_trigger(load_trigger_spec("sig"), shape)


def test_empty_batch_and_chunking_give_the_same_results(monkeypatch):
    for name in BUILTIN_TRIGGERS:
        trigger = build_trigger(load_trigger_spec(name), (4, 4, 3))
        assert trigger.apply(batch((4, 4, 3), n=0)).shape == (0, 4, 4, 3)
        x = batch((4, 4, 3), n=7)
        whole = trigger.apply(x)
        monkeypatch.setattr(trigger_apply, "APPLY_CHUNK_ELEMENTS", 2 * 48)  # chunks of 2 images
        assert torch.equal(trigger.apply(x), whole), name
        monkeypatch.undo()


def test_apply_works_on_non_contiguous_input():
    trigger = build_trigger(load_trigger_spec("wanet"), (8, 8, 3))
    x = batch((8, 8, 3), n=4)
    strided = x[::2]
    assert torch.equal(trigger.apply(strided), trigger.apply(strided.contiguous()))


# ---------------------------------------------------------------- poisoned sets


def labelled(n=20, classes=4, shape=(6, 6, 3)):
    return batch(shape, n=n), torch.arange(n, dtype=torch.int64) % classes


def test_poisoned_eval_set_excludes_target_class_and_keeps_true_labels():
    x, y = labelled()
    trigger = build_trigger(dataclasses.replace(load_trigger_spec("badnets"), target=1), (6, 6, 3))
    xp, yp, keep = make_poisoned_eval_set(trigger, x, y)
    assert keep.tolist() == (y != 1).tolist()
    assert len(xp) == len(yp) == 15 and (yp != 1).all() and torch.equal(yp, y[y != 1])
    assert torch.equal(xp, trigger.apply(x[keep]))


def test_poison_training_set_counts_indices_and_determinism():
    x, y = labelled(n=40)
    x0, y0 = x.clone(), y.clone()
    trigger = build_trigger(dataclasses.replace(load_trigger_spec("badnets"), target=2), (6, 6, 3))
    xn, yn, idx = poison_training_set(trigger, x, y, 0.25, seed=7)
    assert idx.dtype == torch.int64 and len(idx) == 10
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 10
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert (yn[idx] == 2).all() and torch.equal(xn[idx], trigger.apply(x[idx]))
    rest = torch.ones(40, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(xn[rest], x[rest]) and torch.equal(yn[rest], y[rest])
    assert torch.equal(poison_training_set(trigger, x, y, 0.25, seed=7)[2], idx)
    assert not torch.equal(poison_training_set(trigger, x, y, 0.25, seed=8)[2], idx)


def test_poison_rate_edges_and_errors():
    x, y = labelled(n=10)
    trigger = build_trigger(load_trigger_spec("sig"), (6, 6, 3))
    assert len(poison_training_set(trigger, x, y, 0.0, 0)[2]) == 0
    assert poison_training_set(trigger, x, y, 1.0, 0)[2].tolist() == list(range(10))
    assert len(poison_training_set(trigger, x, y, 0.01, 0)[2]) == 0  # round(0.1) = 0
    for rate in (1.5, -0.1, True, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match="poison rate must be a number in \\[0, 1\\]"):
            poison_training_set(trigger, x, y, rate, 0)
    with pytest.raises(ConfigError, match="seed"):
        poison_training_set(trigger, x, y, 0.1, -1)
    with pytest.raises(InputError, match="do not match"):
        poison_training_set(trigger, x, y[:5], 0.1, 0)
