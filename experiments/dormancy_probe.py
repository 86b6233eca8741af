"""Which stamp tells a dormant backdoor from a removed one in the dormancy check, without the trigger?

    python experiments/dormancy_probe.py dump OUT.pt [--stop] -- <bdclean purify arguments>
        runs purify and saves the scan's chosen reconstructions with the run's tuning and held-out images (the scan
        gives the same answer on every run, so a dump made again is the run's own); --stop ends it after the scan
    [PROBES=recon,opaque,window] [POISONED=5] [SEED=0] python experiments/dormancy_probe.py probe DUMP.pt CKPT...
        for each checkpoint (a purified output, or the clean parent for scale), the dormancy check's retuning
        (verdicts/dormancy.py, the authors' 5 images, 5 epochs) with each stamp, and its proxy ASR before and after
        on the held-out images

The stamps: `recon`, the soft reconstruction itself (the check until the eighteenth session); `opaque`, its
round(L1) heaviest pixels opaque (`make_opaque`, the check since); `window`, its densest window (a quarter of the
side) opaque with its pattern. The outputs' true-trigger retuning (`bdclean compare ... --retune-check --trigger`)
is the label each is read against. An experiment's instrument, not an option of the package: `dump` wraps
purify's scan step. Measured in docs/purification.md (eighteenth session).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.models.building import build_model
from backdoor_cli.scanning.guided import densest_window, window_side
from backdoor_cli.scanning.inversion import ClassTrigger
from backdoor_cli.verdicts import dormancy
from backdoor_cli.verdicts.retune import RetuneSettings


def dump(out: str, stop: bool, args: list[str]) -> None:
    from backdoor_cli.cli import main as bdclean
    from backdoor_cli.usecases import purify

    original = purify._scan_for_triggers

    def scan_and_save(model, tune_set, monitor, subject, mean, std, *rest, **kw):
        evidence = original(model, tune_set, monitor, subject, mean, std, *rest, **kw)
        torch.save(
            {
                "triggers": [t.__dict__ for t in evidence.chosen],
                "flagged": evidence.result.flagged,
                "tune": (tune_set.x.cpu(), tune_set.y.cpu()),
                "hold": (monitor.images.x.cpu(), monitor.images.y.cpu()),
                "mean": mean.cpu(),
                "std": std.cpu(),
            },
            out,
        )
        print(f"dumped {len(evidence.chosen)} reconstruction(s) to {out}", file=sys.stderr)
        if stop:
            raise SystemExit(0)
        return evidence

    purify._scan_for_triggers = scan_and_save
    sys.argv = ["bdclean", "purify", *args]
    bdclean()


def window(t: ClassTrigger) -> ClassTrigger:
    """The reconstruction's densest window (a quarter of the side) fully opaque, its pattern kept."""
    side = window_side(*t.mask.shape)
    top, left = densest_window(t.mask, side)
    mask = torch.zeros_like(t.mask)
    mask[top : top + side, left : left + side] = 1.0
    return ClassTrigger(t.target, mask, t.pattern, float(side * side), t.success, t.reached, t.steps)


def load(path: str) -> torch.nn.Module:
    ckpt = read_checkpoint(path)
    arch = ckpt.metadata["arch"]
    model = build_model(arch, 10, 3)
    model.load_state_dict(ckpt.state_dict)
    return model.eval()


def probe(dump_path: str, ckpts: list[str]) -> None:
    from backdoor_cli.data.image_set import ImageSet

    d = torch.load(dump_path, weights_only=False)
    tune, hold = ImageSet(*d["tune"]), ImageSet(*d["hold"])
    mean, std = d["mean"], d["std"]
    triggers = [ClassTrigger(**t) for t in d["triggers"]]
    probes = {"recon": lambda t: t, "opaque": dormancy.make_opaque, "window": window}
    wanted = os.environ.get("PROBES", "recon,opaque,window").split(",")
    probes = {k: v for k, v in probes.items() if k in wanted}
    sizes = [int(v) for v in os.environ.get("POISONED", "5").split(",")]
    for path in ckpts:
        model = load(path)
        model.to(memory_format=torch.channels_last)
        for name, make in probes.items():
            for poisoned in sizes:
                settings = RetuneSettings(
                    poisoned=poisoned, sgd=dormancy.dormancy_settings(int(os.environ.get("SEED", "0")), True).sgd
                )
                start = time.perf_counter()
                checks = dormancy.check_dormancy(
                    model,
                    tune,
                    hold,
                    triggers,
                    mean,
                    std,
                    settings,
                    torch.device("cpu"),
                    True,
                    precision="bf16",
                    make_stamp=make,
                )
                for c in checks:
                    print(
                        f"{path.split('/')[-2]:28s} {name:7s} p{poisoned:<3d} class {c.target}: "
                        f"{c.proxy.value:6.1%} -> {c.proxy_retuned.value:6.1%} dormant={c.dormant} "
                        f"({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        rest = sys.argv[2:]
        stop = "--stop" in rest[: rest.index("--")]
        dump(rest[0], stop, rest[rest.index("--") + 1 :])
    else:
        probe(sys.argv[2], sys.argv[3:])
