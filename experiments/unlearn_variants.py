"""Two ways the default's unlearning might cost fresh images less: freeze the early layers, or average the epochs.

    python experiments/unlearn_variants.py VARIANT -- <bdclean arguments>
    BD="python experiments/unlearn_variants.py average:5 --" bash experiments/default_grid.sh OUT NAME CKPT

VARIANT:
  freeze:P1,P2,...  parameters whose names start with one of the prefixes do not train, and the modules
                    that hold them stay in eval mode (their BatchNorm statistics are the input's);
  average:K         the tuned weights (and BatchNorm statistics) are the mean of the last K epochs' ends,
                    not the last epoch's (stochastic weight averaging's idea on the unlearning's cosine run).

Why: on fresh images (the defender's own, never trained on) the unlearning costs the strong ResNet-32 3-4
points, while on the training split it costs under 1. A lower rate and distilling the input's clean outputs
lowered that cost and left more of the weaker subjects' backdoors (docs/purification.md). Freezing the early
layers keeps the features the fresh images share with the training set; averaging flattens the end of the
run. Both act on every run of the default's tuning (gentler reruns included).

An experiment's instrument, not an option of the package: it wraps `defenses.unlearn`'s call of the tuning loop.
"""

from __future__ import annotations

import sys

import torch

from backdoor_cli.cli import main as bdclean
from backdoor_cli.defenses import finetune, unlearn


def install_freeze(prefixes: tuple[str, ...]) -> None:
    select = finetune.select_trainable

    def selecting(model, head, trains, held=()):
        trainable, frozen = select(model, head, trains, held)
        names = {id(p): n for n, p in model.named_parameters()}
        for p in trainable:
            if names[id(p)].startswith(prefixes):
                p.requires_grad_(False)
        held = [
            m for n, m in model.named_modules() if n.startswith(prefixes) and not list(m.children()) and m not in frozen
        ]
        return [p for p in trainable if p.requires_grad], frozen + held

    finetune.select_trainable = selecting


def install_average(last: int) -> None:
    tuning = unlearn.run_tuning

    def averaging(defense, model, *args, **kwargs):
        epochs = (
            kwargs["params"] if "params" in kwargs else args[4]
        ).sgd.epochs  # (head, clean, mean, std, params, ...)
        inner = kwargs.get("on_epoch")
        total: dict[str, torch.Tensor] = {}
        count = [0]

        def on_epoch(log):
            if log.epoch > epochs - last:
                for name, value in model.state_dict().items():
                    if value.is_floating_point():
                        total[name] = total.get(name, 0) + value.detach().double()
                count[0] += 1
            if inner is not None:
                inner(log)  # the default's monitor reads the epoch's own weights, as without averaging

        kwargs["on_epoch"] = on_epoch
        outcome = tuning(defense, model, *args, **kwargs)
        if count[0]:
            state = model.state_dict()
            model.load_state_dict({n: (total[n] / count[0]).to(v.dtype) if n in total else v for n, v in state.items()})
            outcome.notes.append(f"EXPERIMENT unlearn_variants: the mean of the last {count[0]} epochs' weights")
        return outcome

    unlearn.run_tuning = averaging


if __name__ == "__main__":
    split = sys.argv.index("--")
    kind, _, value = sys.argv[1].partition(":")
    if kind == "freeze":
        install_freeze(tuple(value.split(",")))
    elif kind == "average":
        install_average(int(value))
    else:
        raise SystemExit("VARIANT must be freeze:PREFIXES or average:K")
    sys.argv = ["bdclean", *sys.argv[split + 1 :]]
    bdclean()
