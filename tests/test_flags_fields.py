"""Every flag maps to exactly one options field and every field to a flag, for every command; what is
CLI-only or config-only is listed here with its reason. A flag without a field would be dropped without
a word, and a field without a flag is a config key nobody can pass on the command line."""

from __future__ import annotations

import dataclasses

import pytest
import typer
import yaml
from typer.testing import CliRunner

from backdoor_cli import config as C
from backdoor_cli.cli import app

COMMANDS = {
    "evaluate": C.AuditOptions,
    "purify": C.PurifyOptions,
    "compare": C.CompareOptions,
    "scan": C.ScanOptions,
    "train": C.TrainOptions,
    "convert": C.ConvertOptions,
}
# Flags that steer the command line itself, not the run: how results are printed and cached.
CLI_ONLY = {"json_output", "quiet", "cache_dir", "markdown"}
# Per command: flags read by the CLI to build a field, and fields filled from positional arguments.
CLI_BUILT = {
    "evaluate": {"targets", "from_list"},  # positional checkpoints / a list file -> checkpoint or checkpoints (audit)
    "compare": {"from_list"},  # a list file -> checkpoints
}
# Fields no flag sets: filled from the positional `targets` (evaluate), or inherited and refused when a config
# gives them (compare's single checkpoint; purify's retune-clean-count, tested below).
FIELD_FROM_ARGUMENT = {
    "evaluate": {"checkpoint", "checkpoints"},
    "compare": {"checkpoint"},
    "purify": {"retune_clean_count"},
}


def _flags(command: str) -> set[str]:
    """Options and positional arguments by their parameter names."""
    return {p.name for p in typer.main.get_command(app).commands[command].params}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"config"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_a_field_and_every_field_a_flag(command):
    flags, fields = _flags(command) - {"config", "help"}, _fields(COMMANDS[command])
    assert flags - fields - CLI_ONLY - CLI_BUILT.get(command, set()) == set()
    assert fields - flags - FIELD_FROM_ARGUMENT.get(command, set()) == set()


def test_config_keys_that_do_not_exist_are_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"alpah": 0.1}))
    with pytest.raises(C.ConfigError, match="unknown key 'alpah'"):
        C.resolve_options(C.PurifyOptions, {}, str(config))


def test_a_config_key_that_would_go_unused_is_refused(tmp_path):
    """retune-clean-count is an evaluate/compare setting: purify refuses it instead of ignoring it."""
    result = CliRunner().invoke(
        app,
        [
            "purify",
            "x.safetensors",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(_yaml(tmp_path, {"retune-clean-count": 50})),
        ],
    )
    assert result.exit_code == 2 and "retune-clean-count does not apply to purify" in result.output


def test_compare_refuses_a_single_checkpoint_key(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "a.safetensors",
            "b.safetensors",
            "--data",
            str(tmp_path),
            "--config",
            str(_yaml(tmp_path, {"checkpoint": "c.safetensors"})),
        ],
    )
    assert result.exit_code == 2 and "not `checkpoint`" in result.output


def _yaml(tmp_path, body: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_flag_without_a_field_is_refused_not_dropped():
    with pytest.raises(C.ConfigError, match="--shard does not apply"):
        C.resolve_options(C.EvaluateOptions, {"checkpoint": "x", "shard": "0/2"})
    assert C.resolve_options(C.EvaluateOptions, {"checkpoint": "x", "shard": None}).checkpoint == "x"  # not given


def test_evaluate_of_one_checkpoint_refuses_the_audit_only_out(toy_model, tmp_path):
    """--out is where an audit's --purify writes: a single evaluate refuses it by name."""
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            toy_model["model"],
            "--data",
            toy_model["data"],
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
    )
    assert result.exit_code == 2 and "--out" in result.output and "--purify" in result.output
