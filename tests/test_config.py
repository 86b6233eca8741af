"""config.py: YAML + flags precedence, strict keys and types, safe YAML, gate thresholds."""

from __future__ import annotations

import pytest

from backdoor_cli import config as C
from backdoor_cli.config import EvaluateOptions, PurifyOptions, parse_rate, resolve_options
from backdoor_cli.errors import ConfigError


def test_flags_override_config_over_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.05\nclean-fraction: 0.1\nmethod: ft\nmean: [0.5, 0.5, 0.5]\n")
    opts = resolve_options(PurifyOptions, {"lr": 0.02, "method": None}, str(cfg))
    assert opts.lr == 0.02 and opts.clean_fraction == 0.1 and opts.method == "ft"
    assert opts.mean == (0.5, 0.5, 0.5) and opts.epochs is None and opts.batch_size == 128


def test_comma_separated_floats_from_flags():
    opts = resolve_options(EvaluateOptions, {"mean": "0.485,0.456,0.406"})
    assert opts.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1, 2]\n", "expected a number"),
        ("epochs: 2.5\n", "expected an integer"),
        ("epochs: true\n", "expected an integer"),
        ("force: 'yes'\n", "expected true or false"),
        ("lr: .nan\n", "finite"),
        ("lrr: 0.1\n", "unknown key 'lrr'"),
        ("- a\n- b\n", "must hold a mapping"),
        ("!!python/object/apply:os.system ['touch x']\n", "not valid YAML"),
        ("a: [1, 2\n", "not valid YAML"),
        ("max-asr: 5\n", "out of range"),
    ],
)
def test_bad_config_values(tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_options(PurifyOptions, {}, str(cfg))


def test_non_utf8_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        resolve_options(PurifyOptions, {}, str(cfg))


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_options(PurifyOptions, {}, str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("text, value", [("0.05", 0.05), ("5%", 0.05), ("0", 0.0), ("1", 1.0), ("100%", 1.0)])
def test_parse_rate(text, value):
    assert parse_rate(text, "--max-asr") == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "-0.1", "abc", "150%"])
def test_parse_rate_rejects(text):
    with pytest.raises(ConfigError):
        parse_rate(text, "--max-asr")


def _out_of_range(name: str):
    low, high, low_open, high_open = C.RANGES[name]
    if low is not None:
        return low if low_open else low - 1
    return high if high_open else high + 1


def test_the_library_parameters_check_the_flags_ranges_declared_once():
    """DefenseParams and RetuneSettings check themselves against config.RANGES: one table, one message."""
    import dataclasses

    from backdoor_cli.defenses import DEFENSES
    from backdoor_cli.defenses.base import DefenseParams
    from backdoor_cli.tuning.sgd import SgdSettings
    from backdoor_cli.verdicts.retune import PROTOCOL, RetuneSettings

    # every method's own parameters (declared beside it), the SGD settings and the label smoothing
    declared = {(d.name, n) for d in DEFENSES.values() for n in d.own_params}
    declared |= {("ft", f.name) for f in dataclasses.fields(SgdSettings)} | {("ft", "label_smoothing")}
    checked = sorted((method, name) for method, name in declared if name in C.RANGES)
    names = {name for _, name in checked}
    assert {"lr", "epochs", "momentum", "distill", "unlearn_fraction", "sau_eps", "nad_beta", "alpha"} <= names
    for method, name in checked:
        bad = _out_of_range(name)
        value = (bad,) if name in ("nad_beta", "sau_lambda") else bad
        if name == "sau_lambda":
            value = (1.0, 1.0, bad)
        with pytest.raises(C.ConfigError, match=f"--{name.replace('_', '-')} must be in"):
            DefenseParams.of(method, **{name: value}).validate()
    with pytest.raises(C.ConfigError, match="--retune-poisoned must be in"):
        RetuneSettings(poisoned=_out_of_range("retune_poisoned")).validate()
    for field, flag in (("epochs", "retune_epochs"), ("lr", "retune_lr")):
        with pytest.raises(C.ConfigError, match=f"--{flag.replace('_', '-')} must be in"):
            RetuneSettings(sgd=dataclasses.replace(PROTOCOL, **{field: _out_of_range(flag)})).validate()


def test_a_list_option_has_each_item_range_checked():
    with pytest.raises(C.ConfigError, match="--nad-beta must be in"):
        C.coerce("nad_beta", "500,-1", "tuple[float, ...] | None", "--nad-beta")
