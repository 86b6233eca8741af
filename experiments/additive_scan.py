"""Does an additive inversion see the triggers a mask inversion cannot (SIG)?

    python experiments/additive_scan.py OUT.json CKPT [CKPT ...] [--arch A --imagenet-norm] [--count 820]

For every class t, the smallest universal perturbation d (L2 norm, pixel space [0, 1]) such that
clip(x + d) sends 95% of clean images of other classes to t, searched like the scan's mask (Adam, a
penalty weight raised while the perturbation works and lowered when it stops, the smallest working one
kept). A signal trigger such as SIG adds a low-amplitude pattern over the whole image: a mask must cover
the image to carry it (a large L1, so Neural Cleanse does not flag it), an additive perturbation needs only
its small norm. The same MAD outlier test on log norms follows. Each class's perturbation is also applied
to a bundled clean reference to see whether a clean model follows it too: as the product picks it, one of
another architecture than the model's, so that it is not the model's parent (the ResNet-56 for a ResNet-20).

An experiment's instrument: clean training images only (a seeded class-balanced draw); no test image and
no recorded trigger is used by the search.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from backdoor_cli.data.datasets import load_dataset, select_clean_subset
from backdoor_cli.scanning.inversion import anomaly_indices
from backdoor_cli.subject import load_subject, normalization_tensors

REFERENCES = Path(__file__).resolve().parents[1] / "backdoor_cli/assets/references"


def invert_additive(
    model,
    x01,
    y,
    classes,
    mean,
    std,
    steps=120,
    per=32,
    lr=0.01,
    success=0.95,
    init_cost=1e-2,
    cost_step=1.5,
    patience=10,
    seed=0,
):
    """Per class, the smallest-L2 universal additive perturbation reaching `success` (all classes in a batch)."""
    gen = torch.Generator().manual_seed(seed)
    count = len(classes)
    _, c, h, w = x01.shape
    delta = torch.zeros(count, c, h, w, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr, betas=(0.5, 0.9))
    pools = [torch.nonzero(y != t).flatten() for t in classes]
    cost = [0.0] * count
    best: list[tuple[float, torch.Tensor] | None] = [None] * count
    hits = torch.zeros(count)
    seen = 0
    wanted = torch.tensor([t for t in classes for _ in range(per)])
    owner = torch.arange(count).repeat_interleave(per)
    for step in range(1, steps + 1):
        picks = torch.cat([p[torch.randperm(len(p), generator=gen)[:per]] for p in pools])
        batch = (x01[picks] + delta[owner]).clamp(0, 1)
        out = model((batch - mean) / std)
        ce = F.cross_entropy(out, wanted, reduction="none").view(count, per).mean(1)
        norms = delta.flatten(1).norm(dim=1)
        loss = (ce + torch.tensor(cost) * norms).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits += (out.argmax(1) == wanted).float().view(count, per).sum(1).detach()
        seen += per
        if step % patience == 0:
            rates = (hits / seen).tolist()
            sizes = norms.detach().tolist()
            for k in range(count):
                if rates[k] >= success:
                    if best[k] is None or sizes[k] < best[k][0]:
                        best[k] = (sizes[k], delta[k].detach().clone())
                    cost[k] = init_cost if cost[k] == 0 else cost[k] * cost_step
                elif cost[k] > 0:
                    cost[k] /= cost_step**1.5
            hits.zero_()
            seen = 0
    found = []
    for k, t in enumerate(classes):
        d = best[k][1] if best[k] is not None else delta[k].detach().clone()
        found.append((t, float(d.norm()), best[k] is not None, d))
    return found


@torch.no_grad()
def rate(model, x01, y, target, d, mean, std):
    others = x01[y != target]
    out = model(((others + d).clamp(0, 1) - mean) / std)
    return float((out.argmax(1) == target).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--arch")
    ap.add_argument("--imagenet-norm", action="store_true")
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--count", type=int, default=820)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    bundle = load_dataset(args.data)
    idx = select_clean_subset(bundle.train.y, None, args.count, args.seed, 10)
    x01 = bundle.train.x[idx].permute(0, 3, 1, 2).float().div(255.0)
    y = bundle.train.y[idx]
    refs = {
        name: load_subject(str(REFERENCES / f"cifar10-{name}.safetensors"), bundle) for name in ("resnet20", "resnet56")
    }
    results = {}
    for path in args.checkpoints:
        norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) if args.imagenet_norm else {}
        subject = load_subject(path, bundle, arch=args.arch, **norm)
        model = subject.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        mean, std = normalization_tensors(subject, torch.device("cpu"))
        ref = refs["resnet56" if subject.arch == "resnet20" else "resnet20"]
        ref_model = ref.model.eval()
        rmean, rstd = normalization_tensors(ref, torch.device("cpu"))
        start = time.perf_counter()
        found = invert_additive(
            model, x01, y, list(range(subject.num_classes)), mean, std, steps=args.steps, lr=args.lr, seed=args.seed
        )
        wall = time.perf_counter() - start
        logs = [math.log(max(n, 1e-3)) for _, n, _, _ in found]
        index, median, mad = anomaly_indices(logs)
        rows = []
        for (t, n, reached, d), a in zip(found, index):
            rows.append(
                {
                    "class": t,
                    "l2": round(n, 3),
                    "linf": round(float(d.abs().max()), 3),
                    "reached": reached,
                    "anomaly": round(a, 2),
                    "success": round(rate(model, x01, y, t, d, mean, std), 3),
                    "reference": round(rate(ref_model, x01, y, t, d, rmean, rstd), 3),
                }
            )
        flagged = [r["class"] for r in rows if r["anomaly"] > 2]
        results[path] = {
            "reference": ref.arch,
            "wall_s": round(wall, 1),
            "median_l2": round(math.exp(median), 3),
            "flagged": flagged,
            "classes": rows,
        }
        print(Path(path).name, f"{wall:.0f}s", "flagged", flagged)
        for r in rows:
            print("  ", r)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
