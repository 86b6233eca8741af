"""What `bdclean purify` runs: the method, how much clean data is held out, and how the result is chosen.

With no --method, purify runs bdclean's default, scan -> unlearn -> verify (docs/purification.md): a
trigger inversion on the clean images finds the suspect class, `unlearn` tunes with its reconstructed
trigger stamped on part of each batch (labels kept), and 20% of the clean images, held out, measure
whether the reconstruction still works afterwards (scanning/guided.py, verdicts/removal.py). The last epoch is kept:
on clean data drawn from the training split the held-out accuracy is that of memorised images and
cannot choose an epoch. With --method NAME the method runs as published (the paper's FST: no held-out
part, the last epoch), unless the user asks for a held-out part or a selection.

Selections:
- last:  the last epoch (the papers' protocol);
- epoch: the latest epoch whose held-out accuracy is within the budget (holdout.HoldoutMonitor);
- path:  the last epoch, then the point nearest it on the line back to the input within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError
from .path_select import DEFAULT_BUDGET, FLOOR

RECOMMENDED_METHOD = "unlearn"
# The recipe's own hyper-parameters, used where the user gave none (none: unlearn's defaults are its own).
RECOMMENDED_PARAMS: dict = {}
# Said with every run of the default, because it is true of the method: it removes what the trigger
# inversion finds, and some triggers hide from inversion.
CAVEAT = (
    "the default removes the trigger a scan reconstructs; blend, SIG, warp and sample-specific triggers can "
    "hide from that scan, and the removal verdict below says when nothing could be verified: pass "
    "--trigger if you know or suspect one, or add --retune-check (docs/purification.md)"
)
RECOMMENDED_HOLDOUT = 0.2
SELECTIONS = ("last", "epoch", "path")
MIN_HELD_PER_CLASS = 2  # fewer held-out images than this per class cannot tell a cost of a few points


@dataclass(frozen=True)
class Recipe:
    method: str
    holdout_fraction: float
    select: str
    budget: float | None  # held-out accuracy the selection may give up (None: no budget)
    recommended: bool  # True when the user named no method
    floor: float = FLOOR  # the path selection's smallest t
    holdout_default: bool = False  # the held-out fraction is the recipe's, not the user's
    note: str | None = None  # why the recipe was changed to fit the data (fit_to_clean_data)

    def params(self) -> dict:
        """Hyper-parameters the recipe sets where the user set none (empty for a named method)."""
        return dict(RECOMMENDED_PARAMS) if self.recommended else {}

    def describe(self) -> str:
        text = self.method + (" (bdclean's default: scan, unlearn, verify)" if self.recommended else "")
        if self.holdout_fraction:
            text += f", {self.holdout_fraction:.0%} of the clean images held out"
            if self.select == "last" and self.recommended:
                text += " to verify the removal"
        if self.select == "path":
            text += f", path selection within {self.budget:.1%} (t >= {self.floor:g})"
        elif self.select == "epoch" and self.budget is not None:
            text += f", latest epoch within {self.budget:.1%}"
        return text

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "recommended": self.recommended,
            "holdout_fraction": self.holdout_fraction,
            "select": self.select,
            "budget": self.budget,
            "floor": self.floor if self.select == "path" else None,
            "note": self.note,
            "caveat": CAVEAT if self.recommended else None,
        }


def resolve_recipe(
    method: str | None,
    holdout_fraction: float | None,
    select: str | None,
    select_budget: float | None,
    floor: float | None = None,
) -> Recipe:
    """Fill in what the user left out; refuse a selection that has no held-out images to decide with.
    `select_budget` is the held-out accuracy the selection may give up (--select-budget); the test-set
    gate --max-acc-drop is a different thing and plays no part here."""
    recommended = method is None
    name = RECOMMENDED_METHOD if recommended else method
    holdout = holdout_fraction if holdout_fraction is not None else (RECOMMENDED_HOLDOUT if recommended else 0.0)
    if select is None:
        # a selection only when asked for with a budget: the default's held-out images verify, they do not select
        select = "epoch" if holdout and select_budget is not None else "last"
    if select not in SELECTIONS:
        raise ConfigError(f"--select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    if select != "last" and not holdout:
        raise ConfigError(
            f"--select {select} decides with held-out clean images, and none are held out",
            hint="pass --holdout-fraction 0.2 (or leave --holdout-fraction at its default)",
        )
    if floor is not None and select != "path":
        raise ConfigError("--path-floor applies to the path selection only", hint="add --select path")
    if select_budget is not None and select == "last":
        raise ConfigError(
            "--select-budget applies to a selection by held-out images",
            hint="add --select epoch or --select path (and --holdout-fraction with --method)",
        )
    budget = select_budget if select_budget is not None else (DEFAULT_BUDGET if select != "last" else None)
    return Recipe(
        name,
        holdout,
        select,
        budget,
        recommended,
        floor=FLOOR if floor is None else floor,
        holdout_default=holdout_fraction is None and recommended,
    )


def fit_to_clean_data(recipe: Recipe, images: int, num_classes: int) -> tuple[Recipe, str | None]:
    """(recipe, warning): with too few clean images to hold the recipe's default part out, tune on
    all of them and keep the last epoch, and say so. A fraction the user asked for is never dropped
    (split_holdout refuses it with a hint instead)."""
    held = int(recipe.holdout_fraction * images)
    if not recipe.holdout_default or held >= MIN_HELD_PER_CLASS * num_classes:
        return recipe, None
    warning = (
        f"only {images} clean images: too few to hold {recipe.holdout_fraction:.0%} out to verify the removal "
        f"(it needs {MIN_HELD_PER_CLASS * num_classes} held-out images for {num_classes} classes); tuning on all "
        "of them, so the reconstructed trigger's ASR is measured on the images it was made from - pass more "
        "clean images (--clean-count, --clean-data) for an independent check"
    )
    return replace(recipe, holdout_fraction=0.0, select="last", budget=None, note=warning), warning
