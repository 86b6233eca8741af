"""Hugging Face (transformers) and timm models: build one from its directory (subject.load_hub_subject
loads it as a Subject), and write the purified model back in the library's own layout.

The directory's JSON is read and checked by hub_config; the weights go through
checkpoint.read_checkpoint like every other checkpoint; nothing is downloaded. The model keeps the
file's state_dict keys: it is not wrapped (a wrapper would prefix every key); its instance gets a
forward that returns the logits tensor, and where transformers renames weights between file and
memory, state_dict hooks translate so `model.state_dict()` speaks the file's names.
"""

from __future__ import annotations

import importlib
import json
import os

import torch
from torch import nn

from ..checkpoint import safetensors_bytes
from ..errors import InputError
from .hub_config import (
    CONFIG,
    METADATA_KEY,
    PREPROCESSOR,
    HubModel,
    hub_from_metadata,
    hub_guess,
    read_model_dir,
)

__all__ = [
    "METADATA_KEY",
    "OUTPUTS",
    "OUTPUT_DIR",
    "HubModel",
    "build_hub_model",
    "hub_from_metadata",
    "hub_guess",
    "hub_layout",
    "read_model_dir",
]

OUTPUT_DIR = "purified-hf"  # beside purified.safetensors in purify's --out
OUTPUTS = tuple(f"{OUTPUT_DIR}/{name}" for name in (CONFIG, "model.safetensors", PREPROCESSOR))


# ---- building the model --------------------------------------------------------------------------


def build_hub_model(hub: HubModel, max_parameters: int | None = None) -> nn.Module:
    """A randomly initialised model of the directory's architecture that returns logits from a tensor.

    With max_parameters (what the weights file holds), the config's model is first built on the meta
    device (shapes only, no memory): a config asking for more parameters than the file has cannot
    match it, and is refused before a possibly huge allocation."""
    construct = _build_transformers if hub.library == "transformers" else _build_timm
    if max_parameters is not None:
        with torch.device("meta"):
            declared = sum(p.numel() for p in construct(hub).parameters())
        if declared > max_parameters:
            raise InputError(
                f"{hub.source} describes a model of {declared:,} parameters but the weights hold {max_parameters:,}",
                hint="the config and the weights do not belong together",
            )
    model = construct(hub)
    if hub.library == "transformers":
        keep_file_keys(model, file_key_map(model, hub))
        model.forward = LogitsForward(model)
    return model.eval()


def import_optional(module: str, extra: str):
    """Import an optional dependency, or raise InputError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module and not str(exc.name or "").startswith(module + "."):
            raise _broken_import(module, extra, exc) from None
        raise InputError(
            f"{extra} models need the optional dependency {module}, which is not installed",
            hint=f'pip install "bdclean[{extra}]"',
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything (RuntimeError from torchvision)
        raise _broken_import(module, extra, exc) from None


def _broken_import(module: str, extra: str, exc: BaseException) -> InputError:
    reason = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    hint = f'pip install "bdclean[{extra}]" into an environment where it imports'
    if "torchvision" in str(exc) or getattr(exc, "name", None) == "torchvision":
        # Seen with PyPI's torchvision beside a CPU-only torch build: "operator torchvision::nms does not exist".
        hint = (
            f"{module} needs torchvision, and this torchvision does not fit the installed torch (PyPI's "
            f"torchvision wheels fail beside CPU-only torch builds); install the torchvision build made for "
            f'your torch, then pip install "bdclean[{extra}]"'
        )
    return InputError(f"{module} cannot be imported ({reason})", hint=hint)


def _build_transformers(hub: HubModel) -> nn.Module:
    # Never the network: these are read when huggingface_hub/transformers are first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    transformers = import_optional("transformers", "hf")
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    model_type = hub.config["model_type"]
    default = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    default = default[0] if isinstance(default, (tuple, list)) else default
    if hub.arch != default:
        raise InputError(
            f"{hub.source}: {hub.arch} is not the image-classification class of model_type "
            f"{model_type!r} in transformers {transformers.__version__} ({default or 'none'})"
        )
    fields = {k: v for k, v in hub.config.items() if k not in ("model_type", "transformers_version")}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # from_config's notices are not the user's business
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
        model = transformers.AutoModelForImageClassification.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise InputError(
            f"{hub.source}: transformers cannot build {hub.arch} from this config "
            f"({exc.__class__.__name__}: {str(exc)[:200]})"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model


def _build_timm(hub: HubModel) -> nn.Module:
    timm = import_optional("timm", "timm")
    if not timm.is_model(hub.arch):
        raise InputError(f"{hub.source}: {hub.arch!r} is not a timm architecture (timm {timm.__version__})")
    try:
        # num_classes comes from the top level (model_args may repeat it, checked equal by hub_config).
        args = {k: v for k, v in hub.config.get("model_args", {}).items() if k != "num_classes"}
        model = timm.create_model(hub.arch, pretrained=False, num_classes=hub.config["num_classes"], **args)
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:
        raise InputError(
            f"{hub.source}: timm cannot build {hub.arch} ({exc.__class__.__name__}: {str(exc)[:200]})"
        ) from None
    return model


def num_classes_of(model: nn.Module, hub: HubModel) -> int:
    if hub.library == "timm":
        return int(hub.config["num_classes"])
    return int(model.config.num_labels)


class LogitsForward:
    """Set as a transformers model's instance `forward`: a pixel tensor in, the logits tensor out, which is
    what bdclean's evaluation and tuning call. A module-level class (not a lambda) so that copy.deepcopy
    and pickle work; it calls the class's forward, so nothing of the original is lost."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, pixel_values: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = type(self.model).forward(self.model, pixel_values, *args, **kwargs)
        return output.logits if hasattr(output, "logits") else output[0]


class RenameKeys:
    """A state_dict post-hook or load_state_dict pre-hook that renames keys in place (torch's public hook
    API requires in-place edits and a callable object, not a bound method)."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping

    def __call__(self, module, state_dict, prefix, *rest) -> None:
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:
            name = key[len(prefix) :] if key.startswith(prefix) else None
            state_dict[prefix + self.mapping[name] if name in self.mapping else key] = value


def file_key_map(model: nn.Module, hub: HubModel) -> dict[str, str]:
    """{in-memory key: file key} for the keys transformers renames between memory and file.

    transformers 5 renames some weights when saving (ViT's `vit.layers.0.attention.q_proj` is written as
    `vit.encoder.layer.0.attention.attention.query`). Its own revert function says how; the reverted
    tensors must be the very same tensors, so only pure renames are accepted: a real conversion
    (fused or transposed weights) would make bdclean's copy differ from the file, and is refused.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps the file's names in memory
        return {}
    state = model.state_dict()
    reverted = revert_weight_conversion(model, dict(state))
    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in state.items()}
    mapping = {}
    for file_key, tensor in reverted.items():
        model_key = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
        if model_key is None or model_key in mapping:
            raise InputError(
                f"transformers converts {hub.arch} weights on saving (not only renames them); "
                "bdclean cannot keep them in the file's layout",
                hint="use a model type whose weights transformers stores as they are in memory",
            )
        mapping[model_key] = file_key
    if len(mapping) != len(state):
        raise InputError(f"transformers' saved layout of {hub.arch} drops weights; bdclean cannot keep it")
    return {k: v for k, v in mapping.items() if k != v}


def keep_file_keys(model: nn.Module, to_file: dict[str, str]) -> None:
    """Make state_dict()/load_state_dict() use the file's key names (only where they differ)."""
    if to_file:
        model.register_state_dict_post_hook(RenameKeys(to_file))
        model.register_load_state_dict_pre_hook(RenameKeys({v: k for k, v in to_file.items()}))


# ---- the written layout ----------------------------------------------------------------------


def hub_layout(hub: HubModel, state: dict[str, torch.Tensor], metadata: dict) -> dict[str, bytes]:
    """The purified model as the library's own directory layout: {file name: bytes}."""
    files = {
        CONFIG: _json_bytes(hub.config),
        # transformers' from_pretrained refuses safetensors files without format 'pt' in their metadata
        "model.safetensors": safetensors_bytes(state, metadata, extra={"format": "pt"}),
    }
    if hub.preprocessor is not None:
        files[PREPROCESSOR] = _json_bytes(hub.preprocessor)
    return files


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
