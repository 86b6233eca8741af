"""The scan searches on a copy with BatchNorm folded into its convolutions (scanning.guided.searchable): the same
fp32 function up to rounding, a memory pass fewer per layer. The model itself is never changed, its modes and
its parameters' grad flags come back, and the scan finds the same class with the fold as without it."""

from __future__ import annotations

import pytest
import torch

from backdoor_cli.evaluation.folding import FOLD_ENV
from backdoor_cli.models.output_kind import LossAdapter
from backdoor_cli.progress import Reporter
from backdoor_cli.scanning.guided import rescan, run_scan, searchable
from backdoor_cli.scanning.inversion import InversionParams
from helpers import CLASSES, planted_scan_subject

PARAMS = InversionParams(steps=120, batch_size=32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_scan_subject(tmp_path_factory.mktemp("fold"))


def _batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_the_searched_copy_folds_batchnorm_and_computes_the_same_function(planted):
    model = planted["model"].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    searched = searchable(model)
    called = [dict(searched.named_modules())[n.target] for n in searched.graph.nodes if n.op == "call_module"]
    assert _batchnorms(model) == 5 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in called)
    x = torch.rand(32, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(searched(x), model(x), atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself is untouched


def test_the_fold_can_be_turned_off(planted, monkeypatch):
    monkeypatch.setenv(FOLD_ENV, "0")
    assert searchable(planted["model"]) is planted["model"]


def _scan(planted):
    return run_scan(
        planted["model"],
        planted["images"],
        CLASSES,
        planted["mean"],
        planted["std"],
        LossAdapter(),
        PARAMS,
        0,
        Reporter(),
    )


def test_a_scan_leaves_the_model_as_it_found_it(planted):
    model = planted["model"].train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = _scan(planted)
    assert model.training and all(m.training for m in model.modules())  # its modes come back
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = rescan(
        model,
        planted["images"],
        result.flagged or [0],
        result,
        planted["mean"],
        planted["std"],
        LossAdapter(),
        PARAMS,
        0,
    )
    assert again and model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


def test_the_fold_finds_what_the_unfolded_search_finds(planted, monkeypatch):
    folded = _scan(planted)
    monkeypatch.setenv(FOLD_ENV, "0")
    plain = _scan(planted)
    assert folded.flagged == plain.flagged == [0]  # the planted target, and nothing else
    for a, b in zip(folded.triggers, plain.triggers):  # rounding-sized differences, not a different search
        assert a.l1 == pytest.approx(b.l1, rel=0.01)
    assert folded.anomaly == pytest.approx(plain.anomaly, abs=0.2)
