"""The CUDA-only parts of tuning and evaluation: graph-replayed steps and exact fp32 evaluation.

The decisions (when graphs are used, what the report says) are tested everywhere; the GPU tests
(`-m gpu`, skipped without CUDA) check that a replayed step computes what the eager step computes."""

from __future__ import annotations

import copy

import pytest
import torch

from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.defenses.fst import project_to_norm
from backdoor_cli.evaluation.measure import predict
from backdoor_cli.models import build_model
from backdoor_cli.tuning.loop import EpochLog, TuneSettings, execution_status, tune, use_cuda_graphs
from backdoor_cli.tuning.sgd import Sgd, SgdSettings

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphs_are_used_on_cuda_only_and_can_be_turned_off(monkeypatch):
    settings = TuneSettings(SgdSettings(epochs=1, lr=0.01))
    monkeypatch.delenv("BDCLEAN_CUDA_GRAPHS", raising=False)
    assert use_cuda_graphs(CUDA, settings, None)
    assert not use_cuda_graphs(CPU, settings, None)
    assert not use_cuda_graphs(CUDA, settings, perturb=lambda grads_here: lambda: None)  # SAM / PAM
    assert not use_cuda_graphs(CUDA, TuneSettings(SgdSettings(epochs=1, lr=0.01), cuda_graphs=False), None)
    monkeypatch.setenv("BDCLEAN_CUDA_GRAPHS", "0")
    assert not use_cuda_graphs(CUDA, settings, None)


def test_the_report_says_how_the_steps_ran():
    assert execution_status(CPU, None, None) == ""
    assert execution_status(CUDA, None, None) == "eager (CUDA graphs turned off)"
    assert "weight-perturbing" in execution_status(CUDA, None, perturb=object())
    cpu_log = EpochLog(1, 0.5, 0.9, 0.01, 1.0)
    assert "execution" not in cpu_log.to_dict()
    assert (
        EpochLog(1, 0.5, 0.9, 0.01, 1.0, execution="CUDA graph (7 replayed steps, 3 eager)")
        .to_dict()["execution"]
        .startswith("CUDA graph")
    )


def test_cpu_keeps_the_multi_tensor_sgd_with_a_float_learning_rate():
    """CPU runs stay bit-for-bit what they were (tests/test_sgd.py): the foreach update, a float lr."""
    optimizer = Sgd([torch.nn.Parameter(torch.zeros(3))], 0.05, 0.9, 0.0, CPU)
    assert optimizer.lr == 0.05 and not optimizer.fused


# ------------------------------------------------------------------------------------------- on a GPU


def _data(n: int, device: torch.device) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageSet(x.to(device), y.to(device))


def _tune(model, data, graphs: bool, monkeypatch, **kwargs):
    monkeypatch.setenv("BDCLEAN_CUDA_GRAPHS", "1" if graphs else "0")
    mean = torch.tensor([0.5, 0.5, 0.5], device=CUDA).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.25, 0.25], device=CUDA).view(1, 3, 1, 1)
    settings = TuneSettings(SgdSettings(epochs=3, lr=0.05, batch_size=64, seed=1))
    return tune(model, data, mean, std, settings, CUDA, precision="fp32", memory_format="contiguous", **kwargs)


@pytest.mark.gpu
@needs_cuda
def test_a_replayed_step_computes_what_the_eager_step_computes(monkeypatch):
    """Same initial weights, same batches (and a smaller last batch, which runs eagerly): the graphed
    run's losses and weights match the eager run's to float rounding, the lr schedule included."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    base = build_model("resnet20", 10).to(CUDA)
    data = _data(64 * 5 + 40, CUDA)
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    head = graphed.linear
    norm = head.weight.detach().norm()
    logs_eager = _tune(eager, data, False, monkeypatch, after_step=lambda: project_to_norm(eager.linear.weight, norm))
    logs_graph = _tune(graphed, data, True, monkeypatch, after_step=lambda: project_to_norm(head.weight, norm))
    assert logs_graph[-1].execution.startswith("CUDA graph"), logs_graph[-1].execution
    assert logs_eager[-1].execution == "eager (CUDA graphs turned off)"
    assert [round(log.lr, 8) for log in logs_graph] == [round(log.lr, 8) for log in logs_eager]
    for a, b in zip(logs_eager, logs_graph):
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name
    assert head.weight.norm().item() == pytest.approx(norm.item(), rel=1e-5)  # the projection ran in the graph


@pytest.mark.gpu
@needs_cuda
def test_evaluation_on_cuda_is_the_models_own_fp32_forward():
    """Default evaluation on the GPU gives the CPU's fp32 predictions (TF32 off), except where the CPU's
    own top-2 margin is below fp32 rounding."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    data = _data(2048, CPU)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)
    on_cpu = predict(model, data.x, mean, std, CPU, batch_size=512)
    with torch.no_grad():
        logits = model(((data.x.permute(0, 3, 1, 2).float() / 255) - mean) / std)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    gpu_model = copy.deepcopy(model).to(CUDA)
    on_gpu = predict(gpu_model, data.x.to(CUDA), mean.to(CUDA), std.to(CUDA), CUDA, batch_size=512).cpu()
    assert torch.equal(on_gpu[clear], on_cpu[clear])
    assert clear.float().mean() > 0.9


# ------------------------------------------------- the replay bookkeeping, with a stand-in for CUDA


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: `capture` records the step (a real capture runs no kernel),
    `replay` runs it on the static buffers, writing into the captured outputs as a replay would."""

    capturing = None

    def __init__(self):
        self.step = None
        self.outputs = None

    def replay(self):
        loss, logits = self.step()
        self.outputs[0].copy_(loss)
        self.outputs[1].copy_(logits)


class _FakeCapture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        _FakeGraph.capturing = self.graph

    def __exit__(self, *exc):
        _FakeGraph.capturing = None
        return False


def _fake_cuda(monkeypatch):
    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: type("S", (), {"wait_stream": lambda self, other: None})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"wait_stream": lambda self, o: None})())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def _counting_step(calls: list, fail_capture: bool = False):
    def step(inputs, labels):
        graph = _FakeGraph.capturing
        if graph is not None:  # being captured: record what a replay will run, run nothing now
            if fail_capture:
                raise RuntimeError("operation not permitted when stream is capturing")
            graph.step = lambda: (inputs.sum(), inputs * 2.0)
            graph.outputs = (torch.zeros(()), torch.zeros_like(inputs))
            return graph.outputs
        calls.append(int(inputs.shape[0]))
        return inputs.sum(), inputs * 2.0

    return step


def test_replays_after_the_warm_up_and_runs_odd_batches_eagerly(monkeypatch):
    from backdoor_cli.tuning.graphed_step import WARMUP_STEPS, GraphedStep

    _fake_cuda(monkeypatch)
    calls: list = []
    graphed = GraphedStep(_counting_step(calls), batch_size=4)
    batches = [torch.full((4,), float(i)) for i in range(6)] + [torch.full((3,), 9.0)]
    for x in batches:  # every step, replayed or not, sees its own batch (read before the next replay)
        loss, logits = graphed(x, torch.zeros(len(x), dtype=torch.long))
        assert loss.item() == x.sum().item() and torch.equal(logits, x * 2.0)
    assert calls == [4] * WARMUP_STEPS + [3]  # warm-up steps and the short last batch ran eagerly
    assert graphed.replays == 6 - WARMUP_STEPS
    assert graphed.status == f"CUDA graph ({graphed.replays} replayed steps, {WARMUP_STEPS + 1} eager)"


def test_a_refused_capture_falls_back_to_eager_and_says_why(monkeypatch):
    from backdoor_cli.tuning.graphed_step import WARMUP_STEPS, GraphedStep

    _fake_cuda(monkeypatch)
    calls: list = []
    graphed = GraphedStep(_counting_step(calls, fail_capture=True), batch_size=2)
    batches = [torch.full((2,), float(i)) for i in range(5)]
    results = [graphed(x, torch.zeros(2, dtype=torch.long)) for x in batches]
    assert [loss.item() for loss, _ in results] == [x.sum().item() for x in batches]
    assert len(calls) == 5 and graphed.replays == 0  # no step was lost to the failed capture
    assert graphed.status.startswith("eager (no CUDA graph: RuntimeError: operation not permitted")
    assert WARMUP_STEPS == 2


def test_a_refusal_keeps_every_step_eager(monkeypatch):
    from backdoor_cli.tuning.graphed_step import GraphedStep

    _fake_cuda(monkeypatch)
    calls: list = []
    graphed = GraphedStep(_counting_step(calls), batch_size=2, refusal=lambda: "the rate is a float")
    for i in range(4):
        graphed(torch.full((2,), float(i)), torch.zeros(2, dtype=torch.long))
    assert len(calls) == 4 and graphed.replays == 0 and graphed.status == "eager (no CUDA graph: the rate is a float)"


def test_sgd_falls_back_to_the_foreach_update_when_the_fused_kernel_is_refused(monkeypatch):
    """A torch without the tensor-lr fused kernel: the same step by the foreach update, no graph capture,
    and no uninitialised momentum buffer left behind by the failed call."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    fused = Sgd(list(a.parameters()), 0.1, 0.9, 1e-4, CPU, fused=True)
    plain = Sgd(list(b.parameters()), 0.1, 0.9, 1e-4, CPU)

    def refuse(*args, **kwargs):
        raise RuntimeError("no tensor-lr overload here")

    monkeypatch.setattr(torch, "_fused_sgd_", refuse)
    for _ in range(3):
        x = torch.randn(8, 4)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert not fused.capturable and fused.fallback.startswith("RuntimeError: no tensor-lr overload")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
