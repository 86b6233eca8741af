"""What a Hugging Face (transformers) or timm model directory says about its model, read as untrusted data.

A directory holds config.json and model.safetensors (or pytorch_model.bin), perhaps also
preprocessor_config.json. The JSON files are size-limited and type-checked here before any library
sees them; a config asking for the repository's own code (`auto_map`, trust_remote_code) is refused
with exit 3; only model types built into transformers are accepted. Nothing here imports a library.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import InputError, UnsafeInputError

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the order transformers and timm prefer them in
MAX_JSON_BYTES = 1 << 20  # real configs are a few kB; anything near this is not a model config
METADATA_KEY = "hub"  # where purified.safetensors keeps the config it needs to be rebuilt

# Image classifiers built into transformers whose forward takes pixel_values and whose head is a Linear.
# Checked on the plain JSON before transformers is imported, so a config cannot pick anything else.
HF_MODEL_TYPES = frozenset(
    {
        "beit",
        "bit",
        "convnext",
        "convnextv2",
        "cvt",
        "data2vec-vision",
        "deit",
        "dinov2",
        "dinov2_with_registers",
        "efficientnet",
        "focalnet",
        "hgnet_v2",
        "hiera",
        "ijepa",
        "levit",
        "mobilenet_v1",
        "mobilenet_v2",
        "mobilevit",
        "mobilevitv2",
        "poolformer",
        "pvt",
        "pvt_v2",
        "regnet",
        "resnet",
        "swiftformer",
        "swin",
        "swinv2",
        "vit",
        "vit_msn",
    }
)
# Keys a config may use to make transformers import code shipped with the repository.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# transformers 5 also accepts a hub repository name as the attention implementation (kernels fetched
# and run from the hub); only its built-in implementations are let through.
BUILTIN_ATTENTION = (None, "eager", "sdpa")
# timm model_args passed to create_model: architecture sizes only. Others (e.g. checkpoint_path,
# pretrained_cfg_overlay) would make timm read files or the network.
TIMM_MODEL_ARGS = frozenset(
    {
        "img_size",
        "in_chans",
        "global_pool",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "drop_rate",
        "drop_path_rate",
        "class_token",
        "reg_tokens",
    }
)
# timm names are registry names with an optional pretrained tag; ':' or '/' would mean hf-hub: or a path.
_TIMM_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,120}$")
_MAX_CLASSES = 100_000


@dataclass
class HubModel:
    """What a model directory (or the metadata of bdclean's purified copy of one) says about the model."""

    library: str  # 'transformers' | 'timm'
    arch: str  # transformers class name or timm architecture
    config: dict
    preprocessor: dict | None
    weights: Path
    source: str  # where the config was read: 'config.json' or 'checkpoint metadata'

    def describe(self) -> str:
        model_type = f" (model_type {self.config['model_type']})" if self.library == "transformers" else ""
        return f"{self.library} {self.arch}{model_type}, from {self.source}"

    def to_metadata(self) -> dict:
        return {"library": self.library, "config": self.config, "preprocessor": self.preprocessor}


@dataclass
class InputSpec:
    """What the model expects to be fed, and which file said so."""

    channels: int
    sizes: list[tuple[tuple[int, int], str]]  # every fixed input size a file declares, with the file
    mean: list[float] | None
    std: list[float] | None
    norm_source: str | None


# ---- reading the directory -------------------------------------------------------------------


def read_model_dir(path: str | Path) -> HubModel:
    """Validate a model directory's JSON files and find its weights; no library is imported."""
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise InputError(
            f"{path} is a directory without {CONFIG}",
            hint=f"pass a checkpoint file, or a Hugging Face/timm model directory ({CONFIG} + "
            f"{' or '.join(WEIGHT_FILES)})",
        )
    config = read_json_object(config_path)
    preprocessor = read_json_object(path / PREPROCESSOR) if (path / PREPROCESSOR).exists() else None
    library, arch = parse_config(config, str(config_path))
    if preprocessor is not None:
        _check_preprocessor(preprocessor, str(path / PREPROCESSOR))
    return HubModel(library, arch, config, preprocessor, _weights_file(path), CONFIG)


def read_json_object(path: Path) -> dict:
    """A JSON object from an untrusted file: bounded size, UTF-8, no NaN/Infinity, an object at the top."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{path} is {size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for a model config")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _weights_file(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    if any(path.glob("*.index.json")):
        raise InputError(
            f"{path} holds a sharded checkpoint (*.index.json); bdclean reads single-file weights",
            hint="merge the shards with the library's save_pretrained(..., max_shard_size='100GB')",
        )
    raise InputError(f"{path} has {CONFIG} but no weights ({' or '.join(WEIGHT_FILES)})")


def parse_config(config: dict, where: str) -> tuple[str, str]:
    """('transformers', class name) or ('timm', architecture) after checking every field bdclean uses."""
    remote = [k for k in REMOTE_CODE_KEYS if k in config]
    if remote:
        raise UnsafeInputError(
            f"refused {where}: '{remote[0]}' asks to run code shipped with the model "
            "(trust_remote_code); bdclean only builds models built into the library",
            hint="use a model whose architecture is part of transformers or timm",
        )
    attention = [config.get(k) for k in ("attn_implementation", "_attn_implementation")]
    if any(a not in BUILTIN_ATTENTION for a in attention):
        raise UnsafeInputError(
            f"refused {where}: attention implementation "
            f"{str(next(a for a in attention if a not in BUILTIN_ATTENTION))[:60]!r} is not built "
            "into transformers (it would load kernel code)",
            hint="use eager or sdpa",
        )
    if "quantization_config" in config:
        raise InputError(
            f"{where}: quantized models are not supported (quantization_config)", hint="use the full-precision model"
        )
    if "model_type" in config or "architectures" in config:
        return "transformers", _check_transformers_config(config, where)
    if "architecture" in config:
        return "timm", _check_timm_config(config, where)
    raise InputError(
        f"{where} is neither a transformers config (model_type, architectures) nor a timm one "
        "(architecture, num_classes, pretrained_cfg)"
    )


def _check_transformers_config(config: dict, where: str) -> str:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise InputError(
            f"{where}: model_type {str(model_type)[:60]!r} is not an image classifier bdclean supports",
            hint=f"supported: {', '.join(sorted(HF_MODEL_TYPES))}",
        )
    archs = config.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) and archs[0].isidentifier()):
        raise InputError(f"{where}: 'architectures' must list exactly one class name, got {str(archs)[:80]}")
    _optional_int(config, "num_channels", 1, 4, where)
    labels = config.get("id2label")
    if labels is not None and (not isinstance(labels, dict) or not 2 <= len(labels) <= _MAX_CLASSES):
        raise InputError(f"{where}: 'id2label' must map 2-{_MAX_CLASSES} class ids to names")
    return archs[0]


def _check_timm_config(config: dict, where: str) -> str:
    arch = config.get("architecture")
    if not isinstance(arch, str) or not _TIMM_NAME.match(arch):
        raise InputError(
            f"{where}: 'architecture' must be a timm model name, got {str(arch)[:80]!r}",
            hint="names like resnet18 or vit_tiny_patch16_224.augreg_in21k; no hf-hub: or paths",
        )
    if _optional_int(config, "num_classes", 2, _MAX_CLASSES, where) is None:
        raise InputError(f"{where}: a timm config needs 'num_classes'")
    cfg = config.get("pretrained_cfg", {})
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: 'pretrained_cfg' must be an object")
    size = cfg.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and all(_is_int(v, 1, 8192) for v in size)):
        raise InputError(f"{where}: pretrained_cfg.input_size must be [channels, height, width], got {str(size)[:60]}")
    for key in ("mean", "std"):
        _numbers(cfg.get(key), f"{where}: pretrained_cfg.{key}")
    args = config.get("model_args", {})
    if not isinstance(args, dict):
        raise InputError(f"{where}: 'model_args' must be an object")
    # timm's save_for_hf repeats num_classes in model_args; it must agree with the top-level one bdclean builds.
    if args.get("num_classes", config["num_classes"]) != config["num_classes"]:
        raise InputError(
            f"{where}: model_args.num_classes {str(args['num_classes'])[:20]} contradicts num_classes "
            f"{config['num_classes']}"
        )
    unknown = sorted(set(args) - TIMM_MODEL_ARGS - {"num_classes"})
    if unknown:
        raise InputError(
            f"{where}: model_args {', '.join(unknown[:5])} are not passed to timm by bdclean",
            hint=f"bdclean passes only architecture sizes: {', '.join(sorted(TIMM_MODEL_ARGS))}",
        )
    return arch


def _check_preprocessor(pre: dict, where: str) -> None:
    for key in ("image_mean", "image_std"):
        _numbers(pre.get(key), f"{where}: {key}")
    for key in ("size", "crop_size"):
        if pre.get(key) is not None:
            _size(pre[key], f"{where}: {key}")
    factor = pre.get("rescale_factor", 1 / 255)
    if (
        pre.get("do_rescale", True) is not True
        or not isinstance(factor, (int, float))
        or not math.isclose(factor, 1 / 255, rel_tol=1e-4)
    ):
        # bdclean feeds pixels scaled to [0, 1]; a model trained on other scales would get wrong inputs silently.
        raise InputError(
            f"{where}: the model expects pixels rescaled by {str(factor)[:20]} "
            f"(do_rescale {pre.get('do_rescale', True)}); bdclean feeds pixels / 255"
        )


def _is_int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _optional_int(config: dict, key: str, lo: int, hi: int, where: str) -> int | None:
    value = config.get(key)
    if value is not None and not _is_int(value, lo, hi):
        raise InputError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {str(value)[:40]}")
    return value


def _numbers(value, where: str) -> list[float] | None:
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and 1 <= len(value) <= 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise InputError(f"{where} must be a list of 1-4 finite numbers, got {str(value)[:60]}")
    return [float(v) for v in value]


def _size(value, where: str) -> tuple[int, int] | None:
    """(height, width) of a size field (an int, [h, w], or {height, width}); None for a resize rule
    like {shortest_edge} that fixes no size."""
    if _is_int(value, 1, 8192):
        return value, value
    if isinstance(value, list) and len(value) == 2 and all(_is_int(v, 1, 8192) for v in value):
        return value[0], value[1]
    if isinstance(value, dict) and ("height" in value or "width" in value):
        h, w = value.get("height"), value.get("width")
        if _is_int(h, 1, 8192) and _is_int(w, 1, 8192):
            return h, w
    elif isinstance(value, dict) and all(_is_int(v, 1, 8192) for v in value.values()):
        return None
    raise InputError(
        f"{where} must be an image size (an integer, [height, width] or {{height, width}}), got {str(value)[:60]}"
    )


def hub_from_metadata(ckpt: Checkpoint) -> HubModel:
    """The HubModel recorded in a purified.safetensors' metadata (as untrusted as any config.json)."""
    where = f"{ckpt.path}: embedded metadata"
    record = ckpt.metadata.get(METADATA_KEY)
    config = record.get("config") if isinstance(record, dict) else None
    preprocessor = record.get("preprocessor") if isinstance(record, dict) else None
    if not isinstance(config, dict) or not (preprocessor is None or isinstance(preprocessor, dict)):
        raise InputError(f"{where}: '{METADATA_KEY}' must hold a config object (and optionally a preprocessor object)")
    if len(json.dumps(record)) > 2 * MAX_JSON_BYTES:
        raise InputError(f"{where}: the recorded model config is over the size limit")
    library, arch = parse_config(config, where)
    if record.get("library") != library:
        raise InputError(f"{where}: library {str(record.get('library'))[:40]!r} does not match its config ({library})")
    if preprocessor is not None:
        _check_preprocessor(preprocessor, where)
    return HubModel(library, arch, config, preprocessor, ckpt.path, "checkpoint metadata")


# ---- what the model expects ---------------------------------------------------------------------


def input_spec(hub: HubModel) -> InputSpec:
    if hub.library == "timm":
        return _timm_input_spec(hub)
    config, pre = hub.config, hub.preprocessor or {}
    sizes = []
    if config.get("image_size") is not None:
        size = _size(config["image_size"], f"{CONFIG}: image_size")
        sizes += [(size, f"{CONFIG} image_size")] if size else []
    key = "crop_size" if pre.get("do_center_crop") and pre.get("crop_size") is not None else "size"
    if pre.get(key) is not None:
        size = _size(pre[key], f"{PREPROCESSOR}: {key}")
        sizes += [(size, f"{PREPROCESSOR} {key}")] if size else []
    if hub.preprocessor is None:
        mean = std = None
    elif pre.get("do_normalize", True) is False:
        mean, std = [0.0], [1.0]  # the model was trained on unnormalised [0, 1] pixels
    else:
        mean, std = pre.get("image_mean"), pre.get("image_std")
    source = PREPROCESSOR if mean is not None else None
    return InputSpec(config.get("num_channels", 3), sizes, mean, std, source)


def _timm_input_spec(hub: HubModel) -> InputSpec:
    cfg, args = hub.config.get("pretrained_cfg", {}), hub.config.get("model_args", {})
    sizes, channels = [], args.get("in_chans", 3)
    if cfg.get("input_size"):
        channels, h, w = cfg["input_size"]
        sizes.append(((h, w), "pretrained_cfg input_size"))
    if args.get("img_size") is not None:
        sizes.append((_size(args["img_size"], f"{CONFIG}: model_args.img_size"), "model_args img_size"))
    mean, std = cfg.get("mean"), cfg.get("std")
    return InputSpec(channels, [s for s in sizes if s[0]], mean, std, "pretrained_cfg" if mean is not None else None)


def check_input_shape(spec: InputSpec, image_shape: tuple[int, int, int]) -> None:
    """Fail when the data does not have the size and channels the model was made for (never resize silently)."""
    h, w, c = image_shape
    if spec.channels != c:
        raise InputError(
            f"the model takes {spec.channels}-channel images but the data has {c} channel(s)",
            hint="check --data: the model and the dataset do not belong together",
        )
    declared_size(spec)
    for (mh, mw), where in spec.sizes:
        if (mh, mw) != (h, w):
            raise InputError(
                f"the model expects {mw}x{mh} images ({where}) but the data is {w}x{h}",
                hint=f"image folders are resized with --image-size {mh},{mw} (the default for a model "
                "directory); npz data must be stored at that size",
            )


def declared_size(spec: InputSpec) -> tuple[int, int] | None:
    """The one (height, width) the files declare, or None. Files declaring different sizes fit no data, and
    naming only the first mismatch would send the user to the other size and its refusal; so both are named.
    timm's save_for_hf writes such a config for a model built at another img_size unless given data_config."""
    if len({size for size, _ in spec.sizes}) > 1:
        listed = " but ".join(f"{w}x{h} ({where})" for (h, w), where in spec.sizes)
        raise InputError(
            f"the model's config contradicts itself on the input size: {listed}",
            hint="make them agree; for a timm model, save_for_hf(model, dir, "
            "data_config={'input_size': (3, H, W)}) records the size it is built for",
        )
    return tuple(spec.sizes[0][0]) if spec.sizes else None


# ---- inspect, without building the model ---------------------------------------------------------


def hub_guess(hub: HubModel, state: dict[str, torch.Tensor]) -> dict:
    """inspect's 'guess' block for a hub model: from its config and weights, without building it."""
    labels = hub.config.get("id2label")
    classes = hub.config.get("num_classes") if hub.library == "timm" else (len(labels) if labels else None)
    return {
        "arch": f"{hub.library}:{hub.arch}",
        "arch_from": hub.source,
        "num_classes": classes,
        "in_channels": input_spec(hub).channels,
        "head": _head_from_keys(state, classes),
    }


def _head_from_keys(state: dict[str, torch.Tensor], classes: int | None) -> str | None:
    """The one 2-D weight with a row per class under a head-like name (classifier, head, fc), if unambiguous.
    The file orders keys alphabetically, so position says nothing about where the head is."""
    found = [
        k[: -len(".weight")]
        for k, t in state.items()
        if k.endswith(".weight")
        and t.dim() == 2
        and t.shape[0] == classes
        and any(part in ("classifier", "head", "fc") for part in k.split("."))
    ]
    return found[0] if len(found) == 1 else None


def configured_image_size(path: str | Path) -> tuple[int, int] | None:
    """The input size a Hugging Face/timm model directory's config asks for (None for a checkpoint
    file or a config without one): the default `--image-size`, so an image folder of any size is
    resized and centre-cropped to what the model was made for. Reads JSON only."""
    if not Path(path).is_dir():
        return None
    return declared_size(input_spec(read_model_dir(path)))
