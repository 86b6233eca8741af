"""--precision and --memory-format: parsing, auto resolution per CPU capability, the memory-format
choice, and that the run records both in the report and the purified weights' metadata."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli import precision as P
from backdoor_cli.cli import app
from backdoor_cli.config import PurifyOptions, resolve_options
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.errors import ConfigError
from backdoor_cli.models import build_model
from backdoor_cli.tuning.loop import TuneSettings, tune
from backdoor_cli.tuning.sgd import SgdSettings
from helpers import train_toy_model

runner = CliRunner()
CPU = torch.device("cpu")
AVX2 = P.CpuCapability("AVX2", avx512_bf16=False, amx_bf16=False)
AVX512 = P.CpuCapability("AVX512", avx512_bf16=False, amx_bf16=False)
AVX512_BF16 = P.CpuCapability("AVX512", avx512_bf16=True, amx_bf16=False)
AMX = P.CpuCapability("AVX512", avx512_bf16=True, amx_bf16=True)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return train_toy_model(tmp_path_factory.mktemp("precision"))


# ----------------------------------------------------------------------------- capability and resolution


def test_cpu_flags_and_kind(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert {"avx512_bf16", "amx_bf16"} <= P.cpu_flags(info)
    assert P.cpu_flags(tmp_path / "absent") == frozenset()
    assert (AVX2.kind, AVX512.kind, AVX512_BF16.kind, AMX.kind) == ("AVX2", "AVX512", "AVX512-BF16", "AMX")
    assert not AVX512.native_bf16 and AVX512_BF16.native_bf16 and AMX.native_bf16
    assert AMX.to_dict()["native_bf16"] is True


@pytest.mark.parametrize("cap", [AVX2, AVX512])
def test_auto_is_fp32_without_native_bf16(cap):
    plan = P.resolve_precision("auto", CPU, cap)
    assert (plan.tune, plan.evaluate) == ("fp32", "fp32")
    assert cap.kind in plan.reason


@pytest.mark.parametrize("cap", [AVX512_BF16, AMX])
def test_auto_tunes_in_bf16_with_native_bf16(cap, monkeypatch):
    plan = P.resolve_precision(None, CPU, cap)
    assert plan.requested == "auto" and plan.tune == "bf16"
    # bf16 with the near-ties re-run in fp32: the figures are the fp32 forward's (evaluation/checked.py)
    assert plan.evaluate == P.CHECKED_BF16 and "near-tie re-run in fp32" in plan.reason
    monkeypatch.setenv("BDCLEAN_CHECKED_BF16", "0")
    plan = P.resolve_precision("auto", CPU, cap)
    assert plan.evaluate == "fp32" and "exact" in plan.reason
    monkeypatch.setattr(P, "EVAL_BF16_ON_CPU", True)
    assert P.resolve_precision("auto", CPU, cap).evaluate == "bf16"


def test_auto_on_cuda_and_explicit_choices():
    plan = P.resolve_precision("auto", torch.device("cuda"), AVX2)
    assert (plan.tune, plan.evaluate) == ("bf16", "fp32") and "TF32 off" in plan.reason
    assert P.resolve_precision("fp32", torch.device("cuda"), AMX).evaluate == "fp32"
    plan = P.resolve_precision("bf16", CPU, AVX2)
    assert (plan.tune, plan.evaluate) == ("bf16", "bf16") and "emulated" in plan.reason
    assert P.resolve_precision("BF16", CPU, AMX).reason == "requested"
    with pytest.raises(ConfigError, match="--precision"):
        P.resolve_precision("fp16", CPU, AMX)


def test_options_accept_precision_and_memory_format_in_any_case():
    opts = resolve_options(PurifyOptions, {"precision": "BF16", "memory_format": "channels-last"})
    assert (opts.precision, opts.memory_format) == ("bf16", "channels_last")
    with pytest.raises(ConfigError, match="--memory-format must be one of"):
        resolve_options(PurifyOptions, {"memory_format": "nhwc"})


def test_yaml_precision_is_checked(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("precision: fp16\n")
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        resolve_options(PurifyOptions, {}, str(config))


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("command", ["evaluate", "purify", "compare", "train"])
def test_bad_precision_exits_2_naming_the_choices(command, toy, tmp_path):
    args = {
        "evaluate": ["evaluate", str(toy["model"])],
        "purify": ["purify", str(toy["model"]), "--out", str(tmp_path / "o")],
        "compare": ["compare", str(toy["model"]), str(toy["model"])],
        "train": ["train", "--out", str(tmp_path / "m.safetensors")],
    }[command]
    result = runner.invoke(app, [*args, "--data", str(toy["data"]), "--precision", "fp16", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "--precision must be one of auto, fp32, bf16" in result.output
    assert not (tmp_path / "o").exists()


def test_help_lists_precision_and_memory_format():
    for command in ("evaluate", "purify", "compare", "train"):
        text = runner.invoke(app, [command, "--help"]).output
        assert "--precision" in text and "--memory-format" in text


def _purify(toy, out, *flags):
    result = runner.invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--method",
            "fst",
            "--data",
            str(toy["data"]),
            "--out",
            str(out),
            "--clean-count",
            "60",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            *flags,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def _metadata(path):
    from backdoor_cli.checkpoint import read_checkpoint

    return read_checkpoint(path).metadata


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_purify_records_precision_and_memory_format(toy, tmp_path, precision):
    report = _purify(toy, tmp_path / "out", "--precision", precision, "--memory-format", "contiguous")
    compute = report["environment"]["compute"]
    assert compute["precision"]["requested"] == precision
    assert compute["precision"]["tune"] == compute["precision"]["evaluate"] == precision
    assert {stage: c["format"] for stage, c in compute["memory_format"].items()} == {
        "evaluate": "contiguous",
        "tune": "contiguous",
    }
    assert compute["cpu"]["kind"] == P.cpu_capability().kind
    meta = _metadata(tmp_path / "out" / "purified.safetensors")["purification"]["compute"]
    assert meta == {
        "precision": {"tune": precision, "evaluate": precision},
        "memory_format": {"evaluate": "contiguous", "tune": "contiguous"},
    }
    assert "precision" in (tmp_path / "out" / "report.md").read_text()


def test_auto_precision_follows_this_cpu(toy, tmp_path):
    report = _purify(toy, tmp_path / "out")
    expected = P.resolve_precision("auto", CPU)
    assert report["environment"]["compute"]["precision"]["tune"] == expected.tune
    assert report["environment"]["compute"]["precision"]["evaluate"] == expected.evaluate


def test_bf16_purification_is_repeatable(toy, tmp_path):
    a = _purify(toy, tmp_path / "a", "--precision", "bf16", "--seed", "3")
    b = _purify(toy, tmp_path / "b", "--precision", "bf16", "--seed", "3")
    assert (tmp_path / "a" / "purified.safetensors").read_bytes() == (
        tmp_path / "b" / "purified.safetensors"
    ).read_bytes()
    assert {k: v for k, v in a["after"].items() if k != "seconds"} == {
        k: v for k, v in b["after"].items() if k != "seconds"
    }


def test_purify_times_the_formats_only_when_asked(toy, tmp_path, monkeypatch):
    """A machine where contiguous times faster (here made so): the default keeps channels_last, untimed, and
    says why; `--memory-format timed` measures and keeps contiguous."""
    calls = []

    def faster_contiguous(model, x, device, precision, train, name, loss):
        calls.append(name)
        return (0.5, 0.2) if name == "contiguous" else (1.0, 0.4)

    monkeypatch.setattr(P, "_time_format", faster_contiguous)
    monkeypatch.setattr(P, "FORMAT_MIN_MACS", 1)  # the toy is small enough to skip timing anyway
    monkeypatch.setattr("backdoor_cli.usecases.setup.FORMAT_PAYBACK", 0)  # and its run too short to repay it
    default = _purify(toy, tmp_path / "default")["environment"]["compute"]["memory_format"]
    assert calls == []
    assert {stage: c["format"] for stage, c in default.items()} == {
        "evaluate": "channels_last",
        "tune": "channels_last",
    }
    assert default["tune"]["reason"] == P.AUTO_FORMAT_REASON and default["tune"]["seconds_per_step"] is None
    timed = _purify(toy, tmp_path / "timed", "--memory-format", "timed")["environment"]["compute"]["memory_format"]
    assert calls and set(calls) == {"channels_last", "contiguous"}
    assert timed["tune"]["format"] == "contiguous" and timed["tune"]["reason"].startswith("measured")
    assert timed["tune"]["seconds_per_step"] == {"channels_last": 1.0, "contiguous": 0.5}


def test_evaluate_and_train_record_compute(toy, tmp_path):
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    compute = json.loads(result.output)["environment"]["compute"]
    assert compute["precision"]["evaluate"] == "fp32" and set(compute["memory_format"]) == {"evaluate"}
    out = tmp_path / "m.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "test_tiny",
            "--data",
            str(toy["data"]),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--precision",
            "bf16",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["environment"]["compute"]["precision"]["tune"] == "bf16"
    assert _metadata(out)["training"]["compute"]["precision"] == {"tune": "bf16", "evaluate": "bf16"}


# ----------------------------------------------------------------------------- tuning in bf16


def test_bf16_tuning_runs_the_forward_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = build_model("test_tiny", 3, 3)
    seen = []
    model.conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8)
    data = ImageSet(x, torch.arange(32) % 3)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    history = tune(
        model, data, mean, std, TuneSettings(SgdSettings(epochs=1, lr=0.01, batch_size=16)), CPU, precision="bf16"
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history[0].loss == history[0].loss  # finite (the loss is computed in fp32)


# ----------------------------------------------------------------------------- memory format


def test_requested_format_is_applied_without_timing(monkeypatch):
    monkeypatch.setattr(P, "_time_format", lambda *a, **k: pytest.fail("timed a requested format"))
    model = build_model("simple_cnn", 10, 3)
    choice = P.choose_memory_format(model, torch.randn(4, 3, 32, 32), CPU, "fp32", train=True, spec="contiguous")
    assert choice.format == "contiguous" and choice.reason == "requested"
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("spec", [None, "auto", "AUTO"])
def test_auto_keeps_channels_last_without_timing(monkeypatch, spec, train):
    """The default never times: a format chosen by timing follows the machine's load, and the tuned
    weights follow the format, so the same purify would differ from run to run on a busy machine."""
    monkeypatch.setattr(P, "_time_format", lambda *a, **k: pytest.fail("auto timed the formats"))
    monkeypatch.setattr(P, "FORMAT_MIN_MACS", 1)  # a model that `timed` would time
    model = build_model("simple_cnn", 10, 3).to(memory_format=torch.contiguous_format)
    choice = P.choose_memory_format(model, torch.randn(4, 3, 32, 32), CPU, "bf16", train=train, spec=spec)
    assert choice.format == "channels_last" and choice.reason == P.AUTO_FORMAT_REASON and choice.seconds is None
    assert "not timed" in choice.reason and "--memory-format timed" in choice.reason
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert P.evaluation_format_from_tuning(choice, model) is None  # nothing timed to read the evaluation's from


def test_small_models_keep_channels_last_untimed(monkeypatch):
    monkeypatch.setattr(P, "_time_format", lambda *a, **k: pytest.fail("timed a tiny model"))
    choice = P.choose_memory_format(
        build_model("test_tiny", 10, 3), torch.randn(4, 3, 32, 32), CPU, "fp32", train=False, spec="timed"
    )
    assert choice.format == "channels_last" and "too little" in choice.reason


@pytest.mark.parametrize(
    "times, expected",
    [
        ({"channels_last": 1.0, "contiguous": 0.8}, "contiguous"),
        ({"channels_last": 1.0, "contiguous": 0.95}, "channels_last"),
        ({"channels_last": 0.5, "contiguous": 1.0}, "channels_last"),
    ],
)
def test_measured_choice_needs_a_clear_margin(monkeypatch, times, expected):
    monkeypatch.setattr(
        P, "_time_format", lambda model, x, device, precision, train, name, loss: (times[name], times[name] / 3)
    )
    model = build_model("simple_cnn", 10, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = P.choose_memory_format(model, torch.randn(4, 3, 32, 32), CPU, "fp32", train=True, spec="timed")
    assert choice.format == expected and choice.reason.startswith("measured")
    assert choice.to_dict()["seconds_per_step"] == times
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=P.torch_format(expected))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # timing ran on a copy
    assert choice.forward_seconds == {name: t / 3 for name, t in times.items()}


def test_evaluation_format_comes_from_the_timed_tuning_steps_forward_half(monkeypatch):
    """One timing decides both stages when they run in the same precision: the forward halves of the
    training steps decide the evaluation (here the other way round from the whole step)."""
    halves = {"channels_last": (1.0, 0.5), "contiguous": (0.8, 0.6)}
    monkeypatch.setattr(P, "_time_format", lambda model, x, device, precision, train, name, loss: halves[name])
    model = build_model("simple_cnn", 10, 3)
    tune = P.choose_memory_format(model, torch.randn(4, 3, 32, 32), CPU, "bf16", train=True, spec="timed")
    evaluate = P.evaluation_format_from_tuning(tune, model)
    assert tune.format == "contiguous" and evaluate.format == "channels_last"
    assert evaluate.reason.startswith("measured on the tuning step's forward pass")
    assert evaluate.to_dict()["seconds_per_step"] == {"channels_last": 0.5, "contiguous": 0.6}
    assert P.evaluation_format_from_tuning(P.FormatChoice("channels_last", "requested"), model) is None
    assert P.working_precision(P.CHECKED_BF16) == "bf16" and P.working_precision("fp32") == "fp32"


def test_training_timing_leaves_the_model_untouched(monkeypatch):
    monkeypatch.setattr(P, "FORMAT_MIN_MACS", 1)  # time even a small model: this checks the real timing path
    torch.manual_seed(0)
    model = build_model("test_tiny", 10, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = P.choose_memory_format(model, torch.randn(4, 3, 8, 8), CPU, "fp32", train=True, spec="timed")
    assert set(choice.seconds) == {"channels_last", "contiguous"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_as_format_makes_the_batch_match_the_model():
    nhwc = torch.randn(2, 4, 4, 3).permute(0, 3, 1, 2)  # what data.normalize returns
    assert P.as_format(nhwc, "contiguous").is_contiguous()
    assert P.as_format(nhwc, "channels_last").is_contiguous(memory_format=torch.channels_last)
    flat = torch.randn(2, 5)
    assert P.as_format(flat, "contiguous") is flat


def test_exact_fp32_turns_tf32_off_on_cuda_and_restores_it():
    """The flags are process settings that can be set without a GPU, so this runs anywhere."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with P.exact_fp32(torch.device("cuda")):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), P.exact_fp32(torch.device("cuda")):
            raise RuntimeError("restored on the way out too")
        assert torch.backends.cudnn.allow_tf32
        with P.exact_fp32(CPU):
            assert torch.backends.cudnn.allow_tf32  # nothing to change on a CPU
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_predict_without_a_precision_is_the_models_own_fp32_forward():
    """A library call that names no precision gets exact fp32 on every device, not the tuning default."""
    from backdoor_cli.evaluation.measure import predict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    seen = []
    model.register_forward_hook(lambda _m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    preds = predict(model, x, mean, std, CPU, batch_size=16)
    with torch.no_grad():
        own = model((x.permute(0, 3, 1, 2).float() / 255 - mean) / std).argmax(1)
    assert torch.equal(preds, own)
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)


def test_evaluation_batch_defaults_by_device_and_honours_the_users():
    from backdoor_cli.evaluation.measure import EVAL_BATCH, eval_batch_size

    assert eval_batch_size(None, CPU) == EVAL_BATCH["cpu"] == 128  # cache-sized on CPU (measured, evaluate.py)
    assert eval_batch_size(None, torch.device("cuda")) == EVAL_BATCH["cuda"] == 1024
    assert eval_batch_size(7, CPU) == 7 and eval_batch_size(4096, torch.device("cuda")) == 4096
