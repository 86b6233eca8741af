"""The torch-free method list behind `--help` is the registry's, name for name and word for word."""

from __future__ import annotations

from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.defenses import DEFENSES
from backdoor_cli.method_catalog import DEFAULT, METHODS
from backdoor_cli.selection.recipe import RECOMMENDED_METHOD


def test_the_catalog_is_the_registry():
    assert METHODS == {name: defense.summary for name, defense in DEFENSES.items()}
    assert DEFAULT == RECOMMENDED_METHOD


def test_purify_help_lists_every_registered_method():
    result = CliRunner().invoke(app, ["purify", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    for name in DEFENSES:
        assert f"{name}:" in flat
