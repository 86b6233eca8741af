"""Every method-specific flag acts or is refused by name: `purify --method ft --alpha 0.1` is an error
(exit 2) that names --alpha and the methods that read it, and reports record only what the method used."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.defenses import DEFENSES
from backdoor_cli.defenses.base import TUNING_PARAMS, inapplicable, method_params

runner = CliRunner()


def _purify(toy_model, out, *args):
    return runner.invoke(
        app,
        [
            "purify",
            toy_model["model"],
            "--data",
            toy_model["data"],
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            *args,
        ],
    )


@pytest.mark.parametrize(
    ("args", "flag", "readers"),
    [
        (["--method", "ft", "--alpha", "0.1"], "--alpha", "fst, fst-kd"),
        (["--method", "fst", "--distill", "2"], "--distill", "fst-kd, ft-kd"),
        (["--method", "lp", "--rho", "0.5"], "--rho", "pam, ft-sam"),
        (["--method", "fst", "--teacher-epochs", "2"], "--teacher-epochs", "nad"),
        (["--method", "ft", "--clp-u", "2"], "--clp-u", "clp"),
    ],
)
def test_a_flag_the_method_does_not_read_is_refused_by_name(toy_model, tmp_path, args, flag, readers):
    result = _purify(toy_model, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert f"{flag} does not apply to --method {args[1]}" in result.output
    assert f"read by {readers}" in result.output
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_method_that_does_not_tune_refuses_tuning_flags(toy_model, tmp_path):
    result = _purify(toy_model, tmp_path / "out", "--method", "clp", "--lr", "0.1", "--alpha", "0.2")
    assert result.exit_code == 2
    assert "--lr does not apply to --method clp" in result.output and "--alpha does not apply" in result.output


def test_the_default_reads_unlearn_fraction_and_refuses_alpha(toy_model, tmp_path):
    """No --method: the default (unlearn) reads --unlearn-fraction and records it; FST's --alpha is refused,
    and the message says the default was chosen, not a --method the user never typed."""
    result = _purify(toy_model, tmp_path / "out", "--unlearn-fraction", "0.3")
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "out" / "report.json").read_text())["method"]["params"]
    assert params["unlearn_fraction"] == 0.3 and "alpha" not in params
    refused = _purify(toy_model, tmp_path / "out2", "--alpha", "0.1")
    assert refused.exit_code == 2
    assert "--alpha does not apply to the default method (unlearn)" in refused.output


def test_reports_record_only_the_parameters_the_method_read(toy_model, tmp_path):
    assert _purify(toy_model, tmp_path / "out", "--method", "ft").exit_code == 0
    params = json.loads((tmp_path / "out" / "report.json").read_text())["method"]["params"]
    assert set(params) == set(TUNING_PARAMS)
    assert not set(params) & set(method_params())


def test_every_method_parameter_is_read_by_some_method():
    """Each method's own parameters are its params dataclass's fields, declared beside it; every one is a
    purify flag, and none is also a parameter every tuning method reads."""
    import dataclasses

    from backdoor_cli.config import PurifyOptions

    read = {name for defense in DEFENSES.values() for name in defense.own_params}
    assert read == set(method_params())
    assert read <= {f.name for f in dataclasses.fields(PurifyOptions)} and not read & set(TUNING_PARAMS)
    assert DEFENSES["nad"].own_params == ("nad_beta", "nad_p", "nad_layers", "teacher_epochs")
    assert inapplicable(DEFENSES["fst"], {"alpha": 0.1, "distill": None}) == []
