"""Diagnostic (docs/purification.md, eleventh session): does re-estimating BatchNorm statistics on the
defender's clean images (unaugmented, unstamped) recover the accuracy a fresh-data unlearning cost? Prints C-Acc / ASR / untriggered before and after, for the
bottom-right 4x4 white patch to class 0 (experiments/triggers/patch4.yaml), on the first 4,000 evaluation images.
    python experiments/bn_recalibration.py ARCH SPLIT CHECKPOINT...   (SPLIT: experiments/make_split.py's folder)"""

import copy
import sys

import numpy as np
import torch

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.models import architectures as A

arch, split = sys.argv[1], sys.argv[2]
d = np.load(f"{split}/eval/test.npz")
x, y = d["x"][:4000], d["y"][:4000]
dd = np.load(f"{split}/defender.npz")
dx = dd["x"]


def load(path):
    ck = read_checkpoint(path)
    m = getattr(A, arch)(10)
    m.load_state_dict(ck.state_dict)
    m.eval()
    n = ck.metadata["normalization"]
    return m, torch.tensor(n["mean"]).view(1, 3, 1, 1), torch.tensor(n["std"]).view(1, 3, 1, 1)


def t(xs):
    return torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255


def pred(m, xs, mean, std):
    with torch.no_grad():
        return torch.cat([m((t(xs[i : i + 500]) - mean) / std).argmax(1) for i in range(0, len(xs), 500)]).numpy()


def report(tag, m, mean, std):
    xp = x.copy()
    xp[:, -4:, -4:] = 255
    p0, p1 = pred(m, x, mean, std), pred(m, xp, mean, std)
    nt = y != 0
    print(
        f"{tag:28s} acc {100 * (p0 == y).mean():.2f} asr {100 * (p1[nt] == 0).mean():.2f} untrig {100 * (p0[nt] == 0).mean():.2f}"
    )


def recal(m, mean, std, images):
    m = copy.deepcopy(m)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for i in range(0, len(images), 100):
            m((t(images[i : i + 100]) - mean) / std)
    m.eval()
    return m


for path in sys.argv[3:]:
    m, mean, std = load(path)
    name = path.split("/")[-2] if "purified" in path else path.split("/")[-1]
    report(name, m, mean, std)
    report("  BN recalibrated (1000)", recal(m, mean, std, dx), mean, std)
