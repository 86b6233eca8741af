"""Evaluation that is fast and still the fp32 forward's: checked bf16 (near-ties re-run in fp32) and
BatchNorm folded into the convolutions. Both must give the predictions of the model's own fp32
forward, image for image, including on near-tied (random-weight) models where plain bf16 does not."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli import precision as P
from backdoor_cli.cli import app
from backdoor_cli.evaluation import checked as C
from backdoor_cli.evaluation.checked import CheckedStats, predict_checked
from backdoor_cli.evaluation.folding import fold_batchnorm
from backdoor_cli.evaluation.measure import EvalResult, build_eval_sets, evaluate_model, predict
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.models.architectures import ARCHITECTURES
from helpers import make_npz_dataset

CPU = torch.device("cpu")
MEAN = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
STD = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
runner = CliRunner()


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def random_bn_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm layers with non-trivial statistics and affine weights, so folding has work to do."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
    return model.eval()


# ----------------------------------------------------------------------------- checked bf16


def test_checked_bf16_gives_fp32s_predictions_where_plain_bf16_does_not():
    """A random-weight PreAct-ResNet-18 is near-tied everywhere: bf16 changes some of its answers (1 of
    these 96 on the project's AVX512-BF16 CPU); the checked evaluation re-runs them and gives fp32's."""
    torch.manual_seed(0)
    model = ARCHITECTURES["preactresnet18"](10).eval()
    x = images(96, size=16)
    fp32 = predict(model, x, MEAN, STD, CPU, 32, precision="fp32")
    bf16 = predict(model, x, MEAN, STD, CPU, 32, precision="bf16")
    stats = CheckedStats()
    checked = predict(model, x, MEAN, STD, CPU, 32, precision=P.CHECKED_BF16, stats=stats)
    if P.cpu_capability().native_bf16:  # bf16's kernels differ by CPU: the flips were measured on this kind
        assert int((bf16 != fp32).sum()) > 0 and stats.changed > 0
    assert torch.equal(checked, fp32) and len(fp32.unique()) > 1
    assert stats.images == 96 and stats.sampled == 32  # the first batch of the call is the error sample
    assert stats.rechecked + stats.direct > 0 and 0 < stats.worst_error < 0.1
    record = stats.to_dict()
    assert record["fp32_images"] == stats.sampled + stats.rechecked and record["safety_factor"] == C.CHECK_SAFETY


def _fake_forwards(true_logits: torch.Tensor, noise: torch.Tensor):
    """forward functions over row indices: fp32 returns the true logits, bf16 adds `noise`."""

    def prepare(rows: torch.Tensor) -> torch.Tensor:
        return rows.long()

    return prepare, (lambda rows: true_logits[rows] + noise[rows]), (lambda rows: true_logits[rows])


def test_a_near_tie_bf16_flips_is_re_run_and_a_clear_answer_is_not():
    # 40 images, 3 classes; image 20 is near-tied and bf16's noise flips it; image 30 is clear.
    logits = torch.tensor([[5.0, 0.0, -5.0]]).repeat(40, 1)
    logits[20] = torch.tensor([1.0, 0.999, -3.0])
    noise = torch.zeros_like(logits)
    noise[:8] = 0.01  # the sampled batch shows a small, uniform error (relative 0)
    noise[:8, 1] = 0.02  # ... and a measurable one on the decisive difference
    noise[20, 1] = 0.01  # bf16 says class 1 for image 20; fp32 says class 0
    prepare, low, high = _fake_forwards(logits, noise)
    stats = CheckedStats()
    pred = predict_checked(torch.arange(40), 8, prepare, low, high, stats)
    assert pred[20] == 0 and torch.equal(pred, logits.argmax(1))
    assert stats.sampled == 8 and stats.rechecked == 1 and stats.changed == 1
    assert stats.worst_error == pytest.approx(0.01 / 5.01, rel=1e-3)


def test_a_tie_in_bf16_is_always_re_run_and_the_floor_holds_without_any_sampled_error():
    logits = torch.tensor([[2.0, 1.0]]).repeat(20, 1)
    logits[12] = torch.tensor([0.0, 0.001])  # fp32: class 1
    noise = torch.zeros_like(logits)
    noise[12, 1] = -0.001  # bf16: an exact tie, argmax 0
    prepare, low, high = _fake_forwards(logits, noise)
    stats = CheckedStats()
    pred = predict_checked(torch.arange(20), 4, prepare, low, high, stats)
    assert stats.worst_error == 0.0  # the sample saw no error; the floor (bf16's roundoff) still re-runs ties
    assert pred[12] == 1 and stats.rechecked >= 1


def test_a_mostly_near_tied_first_batch_switches_the_rest_to_fp32_alone():
    logits = torch.tensor([[1.0, 0.99, 0.0]]).repeat(30, 1)  # every image is near-tied
    logits[::3, 1] = 1.01  # fp32 says class 1 for a third of them
    noise = torch.zeros_like(logits)
    noise[:, 0] = 0.02  # bf16 would say class 0 for all
    calls = {"bf16": 0}
    prepare, low, high = _fake_forwards(logits, noise)

    def counted_low(rows):
        calls["bf16"] += 1
        return low(rows)

    stats = CheckedStats()
    pred = predict_checked(torch.arange(30), 10, prepare, counted_low, high, stats)
    assert torch.equal(pred, logits.argmax(1)) and calls["bf16"] == 1  # only the first batch ran bf16
    assert stats.sampled == 10 and stats.direct == 20 and stats.rechecked == 0
    assert stats.to_dict()["fp32_images"] == 30 and stats.to_dict()["fp32_only"] == 20


def test_one_class_models_and_empty_inputs():
    prepare, low, high = _fake_forwards(torch.ones(5, 1), torch.zeros(5, 1))
    assert predict_checked(torch.arange(5), 2, prepare, low, high).tolist() == [0] * 5
    assert predict_checked(torch.arange(0), 2, prepare, low, high).numel() == 0


def test_evaluation_records_what_the_checked_evaluation_ran():
    torch.manual_seed(1)
    model = ARCHITECTURES["simple_cnn"](10).eval()
    from backdoor_cli.data.image_set import ImageSet

    test = ImageSet(images(96), torch.arange(96) % 10)
    sets = build_eval_sets(test, None, CPU)
    checked = evaluate_model(model, sets, MEAN, STD, CPU, 32, precision=P.CHECKED_BF16)
    plain = evaluate_model(model, sets, MEAN, STD, CPU, 32, precision="fp32")
    assert checked.clean_acc.k == plain.clean_acc.k
    assert checked.to_dict()["arithmetic"]["images"] == 96 and "arithmetic" not in plain.to_dict()
    assert EvalResult(Rate(1, 2), None, None, 0.0, 2).checked is None
    # the evaluation cache reads the record back with the counts: a cached figure says how it was computed
    from backdoor_cli.evaluation.cache import result_from_dict

    back = result_from_dict(json.loads(json.dumps(checked.to_dict())), checked.outcomes.to_dict())
    assert back.to_dict()["arithmetic"] == checked.to_dict()["arithmetic"]
    assert result_from_dict(json.loads(json.dumps(plain.to_dict())), plain.outcomes.to_dict()).checked is None


def test_default_evaluate_on_a_native_bf16_cpu_counts_what_the_fp32_forward_counts(tmp_path, monkeypatch):
    """The CLI on a (simulated) AVX512-BF16 CPU: `auto` evaluates checked bf16, its counts are those of
    --precision fp32 on a near-tied PreAct-ResNet-18 (BackdoorBench's layout), and the report says so."""
    data = make_npz_dataset(tmp_path / "data", classes=10, size=16, n_train=20, n_test=120)
    torch.manual_seed(0)
    model = ARCHITECTURES["preactresnet18"](10)
    torch.save(model.state_dict(), tmp_path / "bb.pth")
    monkeypatch.setattr(P, "cpu_capability", lambda: P.CpuCapability("AVX512", avx512_bf16=True, amx_bf16=False))
    monkeypatch.delenv("BDCLEAN_CACHE_DIR", raising=False)  # no cached figures: both runs evaluate
    args = ["evaluate", str(tmp_path / "bb.pth"), "--data", str(data), "--arch", "preactresnet18", "--json"]
    args += ["--device", "cpu", "--memory-format", "channels_last"]
    auto = runner.invoke(app, args)
    exact = runner.invoke(app, [*args, "--precision", "fp32"])
    assert auto.exit_code == 0 and exact.exit_code == 0, auto.output + exact.output
    auto_report, exact_report = json.loads(auto.stdout), json.loads(exact.stdout)
    assert auto_report["metrics"]["clean_acc"]["k"] == exact_report["metrics"]["clean_acc"]["k"]
    assert auto_report["environment"]["compute"]["precision"]["evaluate"] == P.CHECKED_BF16
    assert auto_report["metrics"]["arithmetic"]["images"] == 120
    assert "arithmetic" not in exact_report["metrics"]


# ----------------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("arch", ["simple_cnn", "resnet20", "preactresnet18", "vgg16_bn"])
def test_folded_model_computes_the_same_function_and_leaves_the_model_alone(arch):
    torch.manual_seed(0)
    model = random_bn_stats(ARCHITECTURES[arch](10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert folded.folded > 0 and folded.model is not model and "folded" in folded.reason
    x = torch.randn(16, 3, 32, 32)
    with torch.inference_mode():
        ours, theirs = model(x), folded.model(x)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(ours.abs().max()))
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m.training for m in model.modules())


def test_folding_keeps_mixed_module_modes_after_an_evaluation():
    model = random_bn_stats(ARCHITECTURES["simple_cnn"](10)).train()
    model.features[0][1].eval()  # a BatchNorm the user froze: evaluation must give it back frozen
    from backdoor_cli.data.image_set import ImageSet

    sets = build_eval_sets(ImageSet(images(20), torch.arange(20) % 10), None, CPU)
    evaluate_model(model, sets, MEAN, STD, CPU, 8, precision="fp32")
    assert model.training and model.features[0][0].training and not model.features[0][1].training


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class SharedConvOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))  # the conv's output is used twice: not foldable


def test_models_that_cannot_be_folded_are_evaluated_as_they_are(monkeypatch):
    untraceable = Untraceable().eval()
    result = fold_batchnorm(untraceable)
    assert result.model is untraceable and result.folded == 0 and "cannot trace" in result.reason
    shared = SharedConvOutput().eval()
    result = fold_batchnorm(shared)
    assert result.model is shared and "no convolution -> BatchNorm pair" in result.reason
    hooked = ARCHITECTURES["simple_cnn"](10).eval()
    handle = hooked.fc.register_forward_hook(lambda *_: None)
    assert fold_batchnorm(hooked).model is hooked and "hooks" in fold_batchnorm(hooked).reason
    handle.remove()
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    assert fold_batchnorm(plain).reason == "no BatchNorm2d to fold"
    monkeypatch.setenv("BDCLEAN_FOLD_BN", "0")
    model = ARCHITECTURES["simple_cnn"](10).eval()
    assert fold_batchnorm(model).model is model
