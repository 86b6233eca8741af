"""`bdclean inspect`: what is in a checkpoint, read safely, with no dataset and no model code run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..checkpoint import read_checkpoint
from ..models import guess_architecture, hub


def inspect_checkpoint(path: str | Path) -> dict:
    """Format, tensors, parameter count, guessed architecture and head, embedded bdclean metadata.
    A Hugging Face/timm model directory is described from its config.json and weights file."""
    model = hub.read_model_dir(path) if Path(path).is_dir() else None
    ckpt = read_checkpoint(model.weights if model else path)
    if model is None and hub.METADATA_KEY in ckpt.metadata:
        model = hub.hub_from_metadata(ckpt)
    info = _describe_checkpoint(ckpt)
    if model is not None:
        info.update(path=str(path), hub=model.describe(), guess=hub.hub_guess(model, ckpt.state_dict))
    return info


def _describe_checkpoint(ckpt) -> dict:
    guess = guess_architecture(ckpt.state_dict)
    meta = ckpt.metadata
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in ckpt.state_dict.values())
    return {
        "path": str(ckpt.path),
        "weights": str(ckpt.path),
        "format": ckpt.format,
        "bytes": ckpt.size_bytes,
        "sha256": ckpt.sha256,
        "wrapper": ckpt.wrapper,
        "stripped_prefix": ckpt.stripped_prefix,
        "extra_entries": ckpt.extra_keys,
        "tensors": len(ckpt.state_dict),
        "parameters": ckpt.num_parameters,
        "dtypes": dict(dtypes),
        "guess": {
            "arch": meta.get("arch") or guess.arch,
            "arch_from": "metadata" if meta.get("arch") else ("weights" if guess.arch else None),
            "num_classes": meta.get("num_classes") or guess.num_classes,
            "in_channels": meta.get("in_channels") or guess.in_channels,
            "head": meta.get("head") or guess.head,
        },
        "bdclean_metadata": meta or None,
        "keys": [
            {"name": k, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for k, t in ckpt.state_dict.items()
        ],
    }


def render_inspection(info: dict, console, show_keys: bool = False) -> None:
    from rich.table import Table

    table = Table(show_header=False, title=f"{info['path']}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    guess = info["guess"]
    rows = [
        ("format", info["format"] + (f" (under '{info['wrapper']}')" if info["wrapper"] else "")),
        ("size", f"{info['bytes']:,} bytes"),
        ("sha256", info["sha256"]),
        ("tensors", f"{info['tensors']} ({', '.join(f'{v} {k}' for k, v in info['dtypes'].items())})"),
        ("parameters", f"{info['parameters']:,}"),
        (
            "architecture",
            (guess["arch"] or "unknown (pass --arch)")
            + (f"  [from {guess['arch_from']}]" if guess["arch_from"] else ""),
        ),
        ("classes", str(guess["num_classes"] or "unknown")),
        ("input channels", str(guess["in_channels"] or "unknown")),
        ("head", guess["head"] or "unknown"),
    ]
    if info.get("hub"):
        rows.insert(0, ("model", f"{info['hub']} (weights {Path(info['weights']).name})"))
    if info["stripped_prefix"]:
        rows.append(("prefix stripped", info["stripped_prefix"]))
    if info["extra_entries"]:
        rows.append(("other entries", ", ".join(info["extra_entries"][:8])))
    meta = info["bdclean_metadata"]
    if meta:
        rows.append(("bdclean metadata", f"schema {meta.get('schema')}, tool {meta.get('tool_version')}"))
        if meta.get("trigger"):
            t = meta["trigger"]
            rows.append(("trigger", f"{t.get('type')} -> class {t.get('target')}"))
        if meta.get("poison_rate") is not None:
            rows.append(("poison rate", f"{meta['poison_rate']}"))
        if meta.get("purification"):
            p = meta["purification"]
            rows.append(("purified with", f"{p.get('method')} (input sha256 {str(p.get('input_sha256'))[:12]})"))
    for field, value in rows:
        table.add_row(field, value)
    console.print(table)
    if show_keys:
        keys = Table(title="tensors", title_justify="left")
        for col in ("name", "shape", "dtype"):
            keys.add_column(col)
        for row in info["keys"]:
            keys.add_row(row["name"], "x".join(map(str, row["shape"])) or "scalar", row["dtype"])
        console.print(keys)
