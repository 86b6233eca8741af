"""The scan's pre-screen for many classes: a short search of every class picks the candidates, and only
they and a random reference sample are searched in full (scan.InversionParams.screen_*). Exercised on the
8-class planted model with the screen forced on (it starts above 32 classes by default)."""

from __future__ import annotations

import pytest

from backdoor_cli.models.output_kind import LossAdapter, attach_loss
from backdoor_cli.reports.scan_report import class_verdict
from backdoor_cli.scanning.guided import screen_summary
from backdoor_cli.scanning.inversion import InversionParams, scan_model
from helpers import CLASSES, planted_scan_subject

FORCED = InversionParams(steps=100, batch_size=32, screen_above=4, screen_steps=20, screen_keep=2, screen_reference=4)


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    planted = planted_scan_subject(tmp_path_factory.mktemp("screen"))
    model, images, mean, std = planted["model"], planted["images"], planted["mean"], planted["std"]
    steps = []
    with attach_loss(model, LossAdapter()) as loss_fn:
        result = scan_model(
            model, images.x, images.y, CLASSES, mean, std, loss_fn, FORCED, seed=0, on_step=steps.append
        )
    return result, steps


def test_the_planted_target_survives_the_screen_and_is_flagged(screened):
    result, _ = screened
    assert result.screened and 0 in result.candidates and result.flagged == [0]


def test_only_candidates_can_be_flagged_and_the_reference_is_a_random_sample_of_the_rest(screened):
    result, _ = screened
    assert len(result.candidates) == 2 and len(result.reference) == 4
    assert not set(result.candidates) & set(result.reference)
    assert set(result.flagged) <= set(result.candidates)
    out = [c for c in range(CLASSES) if not result.searched_in_full(c)]
    assert len(out) == CLASSES - 6
    for c in out:  # said in words, never flagged
        assert "screened out" in class_verdict(result, c)
    assert screen_summary(result) == {"candidates": result.candidates, "reference": result.reference}
    assert "random sample of 4 classes" in result.rule and "candidates" in result.rule


def test_the_progress_bar_length_is_the_work_planned(screened):
    _, steps = screened
    assert max(steps) <= FORCED.planned_steps(CLASSES)
    # 8 classes, groups of 16: one screening group of 20 steps, one full group of 100 for 2 + 4 classes
    assert FORCED.planned_steps(CLASSES) == 20 + 100


def test_the_screen_is_off_up_to_its_class_count_and_cuts_the_work_above_it():
    params = InversionParams()
    assert not params.screens(10) and params.planned_steps(10) == params.steps
    # 1,000 classes: 16 batches of 64 classes in the short search, then 2 groups (8 candidates + 24 references)
    assert params.planned_steps(1000) == 16 * params.screen_steps + 2 * params.steps
    assert params.planned_steps(1000) * 10 < -(-1000 // params.group) * params.steps  # 720 against 7,560


def test_the_short_search_draws_fewer_images_per_class_in_larger_batches_of_the_same_size():
    params = InversionParams()
    short = params.screening()
    assert (short.steps, short.batch_size, short.group) == (params.screen_steps, 8, 64)
    assert short.batch_size * short.group == params.batch_size * params.group  # images a step: unchanged
    assert (short.lr, short.success, short.threshold) == (params.lr, params.success, params.threshold)


@pytest.mark.parametrize(
    "field,value",
    [("screen_keep", 0), ("screen_reference", 2), ("screen_steps", 0), ("screen_batch", 0), ("screen_group", 0)],
)
def test_screen_parameters_out_of_range_are_refused(field, value):
    from backdoor_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        InversionParams(**{field: value}).validate()
