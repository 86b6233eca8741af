"""compare A B --path N: the models on the straight line between two checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.errors import ConfigError, InputError
from backdoor_cli.selection.linear_path import interpolate_states, path_points
from helpers import make_npz_dataset, train_badnets_model

runner = CliRunner()


def test_interpolation_ends_midpoint_and_integer_tensors():
    a = {"w": torch.zeros(3), "n": torch.tensor(4)}
    b = {"w": torch.full((3,), 2.0), "n": torch.tensor(9)}
    assert torch.equal(interpolate_states(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_states(a, b, 1.0)["w"], b["w"])
    assert torch.equal(interpolate_states(a, b, 0.5)["w"], torch.ones(3))
    assert int(interpolate_states(a, b, 0.5)["n"]) == 4
    with pytest.raises(InputError, match="same tensors"):
        interpolate_states(a, {"w": b["w"]}, 0.5)
    with pytest.raises(InputError, match="tensor w"):
        interpolate_states(a, {"w": torch.zeros(4), "n": b["n"]}, 0.5)


def test_point_count_is_checked():
    assert path_points(3) == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="between 2 and 101"):
        path_points(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    data = make_npz_dataset(root / "data", classes=3)
    train_badnets_model(data, root / "a.safetensors", 2, 0.1)
    train_badnets_model(data, root / "b.safetensors", 2, 0.0, "--seed", "1")
    return {"data": data, "a": root / "a.safetensors", "b": root / "b.safetensors", "root": root}


def _compare(pair, *args):
    return runner.invoke(
        app,
        ["compare", str(pair["a"]), str(pair["b"]), "--data", str(pair["data"]), "--device", "cpu", "--quiet", *args],
    )


def test_the_path_ends_are_the_two_models(pair, tmp_path):
    plain = _compare(pair, "--json")
    assert plain.exit_code == 0, plain.output
    rows = json.loads(plain.stdout)["rows"]
    traced = _compare(pair, "--path", "4", "--json", "--path-plot", str(tmp_path / "path.png"))
    assert traced.exit_code == 0, traced.output
    report = json.loads(traced.stdout)
    assert report["kind"] == "path" and [p["t"] for p in report["points"]] == [0.0, 0.333333, 0.666667, 1.0]
    for point, row in ((report["points"][0], rows[0]), (report["points"][-1], rows[1])):
        assert point["clean_acc"] == row["metrics"]["clean_acc"]
        assert point["asr"] == row["metrics"]["asr"] and point["asr"]["n"] > 0
    assert (tmp_path / "path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["outputs"]["plot"] == str(tmp_path / "path.png")


def test_path_table_and_markdown(pair):
    table = _compare(pair, "--path", "3")
    assert table.exit_code == 0 and "linear path" in table.stdout
    md = _compare(pair, "--path", "3", "--markdown")
    assert md.exit_code == 0 and md.stdout.count("\n| ") == 4  # header row + 3 points


@pytest.mark.parametrize(
    "args, message", [(["--path", "1"], "between 2 and 101"), (["--path-plot", "x.png"], "--path-plot needs --path")]
)
def test_bad_path_options_exit_2(pair, args, message):
    result = _compare(pair, *args)
    assert result.exit_code == 2 and message in result.output


def test_path_needs_two_checkpoints_of_one_architecture(pair, tmp_path):
    three = runner.invoke(
        app,
        [
            "compare",
            str(pair["a"]),
            str(pair["b"]),
            str(pair["a"]),
            "--data",
            str(pair["data"]),
            "--path",
            "3",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert three.exit_code == 2 and "exactly two checkpoints" in three.output
    other = tmp_path / "other.safetensors"
    trained = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "simple_cnn_half",
            "--data",
            str(pair["data"]),
            "--out",
            str(other),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert trained.exit_code == 0, trained.output
    mixed = runner.invoke(
        app,
        [
            "compare",
            str(pair["a"]),
            str(other),
            "--data",
            str(pair["data"]),
            "--path",
            "3",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert mixed.exit_code == 2 and "same tensors" in mixed.output
