"""Which unlearning objective keeps a model's accuracy without leaving its backdoor dormant?

    [DEPTH=0.333] [LR=0.01] [EPOCHS=10] [SEED=0] python experiments/unlearn_objectives.py DUMP.pt CKPT OUTDIR VARIANT...

DUMP.pt comes from `experiments/dormancy_probe.py dump` (the scan's reconstructions, the run's tuning and held-out
images), so the unlearning runs on exactly the default's inputs without its scan. Each VARIANT unlearns the same
reconstructions from CKPT with the package's `run_unlearn` (window search, held layers, bf16 tuning where the CPU
has it), runs the dormancy check on the output (the reconstruction made opaque, verdicts/dormancy.py), and writes
OUTDIR/VARIANT.safetensors for `bdclean compare ... --trigger T --retune-check --clean-reference PARENT`, which
gives the cost, the true trigger's ASR and its return after retuning. Variants (w: a weight):

  ce           the default's objective: cross-entropy with true labels on every image, stamped or not
  kd:w         + w T^2 KL(input || tuned) on the unstamped images (T = 2; twelfth session's `add`)
  cons:w       + w T^2 KL(input on the image unstamped || tuned on it stamped), on the stamped images: the stamp
               should change nothing the input model said about the clean image (not the input's output on the
               stamped image, which would teach the backdoor back)
  l2sp:w       + w/2 ||theta - theta_input||^2 over the trained parameters (L2-SP)

An experiment's instrument, not an option of the package (whose `--distill` for unlearn is `kd`'s term, taken from
here; as the reruns' default it was measured on whole runs and not adopted). Measured in docs/purification.md
(nineteenth session).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from backdoor_cli.checkpoint import read_checkpoint, write_safetensors
from backdoor_cli.data.image_set import ImageSet
from backdoor_cli.defenses import unlearn
from backdoor_cli.defenses.base import DefenseParams
from backdoor_cli.models.building import build_model
from backdoor_cli.models.head import find_head
from backdoor_cli.scanning.inversion import ClassTrigger
from backdoor_cli.verdicts import dormancy

TEMPERATURE = 2.0


def load(path: str):
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.metadata["arch"], 10, 3)
    model.load_state_dict(ckpt.state_dict)
    return model.eval(), ckpt


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-image T^2 KL(teacher || student) at TEMPERATURE."""
    t = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=1)
    s = F.log_softmax(student_logits.float() / TEMPERATURE, dim=1)
    return (t.exp() * (t - s)).sum(1) * TEMPERATURE**2


def variant_options(name: str, model: torch.nn.Module, recorded: dict) -> dict:
    """run_unlearn's extra options (objective, penalty) for a variant."""
    kind, _, weight = name.partition(":")
    w = float(weight) if weight else 0.0
    if kind == "ce":
        return {}
    if kind == "l2sp":
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = dict(model.named_parameters())

        def penalty():
            total = 0.0
            for n, p in params.items():
                if p.requires_grad:
                    total = total + ((p - start[n]) ** 2).sum()
            return 0.5 * w * total

        return {"penalty": penalty}
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def objective(loss, inputs, labels, logits):
        rows, clean = recorded["rows"], recorded["clean"]
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        with torch.no_grad():
            taught = teacher(clean)
        kl = soft_kl(taught, logits)
        extra = kl * (~rows) if kind == "kd" else kl * rows
        return (ce + w * extra).mean()

    if kind not in ("kd", "cons"):
        raise SystemExit(f"unknown variant {name}")
    return {"objective": objective}


def recording(recorded: dict):
    """Wrap unlearn.trigger_stamp so each batch's stamped rows and its unstamped inputs are known."""
    factory = unlearn.trigger_stamp

    def make(*args, **kwargs):
        stamp = factory(*args, **kwargs)

        def stamp_and_record(inputs, generator):
            out = stamp(inputs, generator)
            recorded["rows"] = (out != inputs).flatten(1).any(1)
            recorded["clean"] = inputs
            return out

        return stamp_and_record

    return make


def main(dump_path: str, ckpt_path: str, outdir: str, variants: list[str]) -> None:
    d = torch.load(dump_path, weights_only=False)
    tune, hold = ImageSet(*d["tune"]), ImageSet(*d["hold"])
    mean, std = d["mean"], d["std"]
    triggers = [ClassTrigger(**t) for t in d["triggers"]]
    depth = float(os.environ.get("DEPTH", "0.333"))
    seed = int(os.environ.get("SEED", "0"))
    params = DefenseParams.of(
        "unlearn",
        lr=float(os.environ.get("LR", "0.01")),
        epochs=int(os.environ.get("EPOCHS", "10")),
        seed=seed,
        frozen_depth=depth,
    )
    recorded: dict = {}
    unlearn.trigger_stamp = recording(recorded)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    for name in variants:
        model, ckpt = load(ckpt_path)
        head = find_head(model)
        model.to(memory_format=torch.channels_last)
        start = time.perf_counter()
        outcome = unlearn.run_unlearn(
            model,
            head,
            tune,
            mean,
            std,
            params,
            device,
            True,
            triggers=triggers,
            windows=triggers,
            **variant_options(name, model, recorded),
        )
        tuned = time.perf_counter() - start
        model.eval()
        checks = dormancy.check_dormancy(
            model, tune, hold, triggers, mean, std, dormancy.dormancy_settings(seed, True), device, True
        )
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        write_safetensors(Path(outdir) / f"{name.replace(':', '_')}.safetensors", state, ckpt.metadata)
        last = outcome.history[-1] if outcome.history else None
        for c in checks:
            print(
                f"{name:10s} depth {depth:.3f} class {c.target}: opaque {c.proxy.value:6.1%} -> "
                f"{c.proxy_retuned.value:6.1%} dormant={c.dormant}; tuning {tuned:.0f} s; "
                f"last train acc {getattr(last, 'train_acc', None)}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
