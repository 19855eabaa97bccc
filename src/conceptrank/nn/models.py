"""Load a model with its preprocessing: a conceptrank model card, or a torchvision model by name.

``--model`` is either a path to a model card (``model.json`` or the folder holding it) or a
torchvision classification model name (``resnet152``). ``--weights`` is then a weights enum
(``DEFAULT``, ``IMAGENET1K_V1``; read from the torch hub cache, never downloaded), a local
state_dict file (loaded with ``weights_only=True``) or ``none`` (random init, seeded).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from conceptrank.errors import ModelError
from conceptrank.io.cache import file_sha256, hash_json

__all__ = [
    "ModelError",
    "LoadedModel",
    "load_model",
    "save_model_card",
    "list_layers",
    "ModelCard",
    "read_model_card",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CARD_FORMAT = "conceptrank-model-card"


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with the preprocessing that belongs to its weights.

    Attributes
    ----------
    module : the ``nn.Module`` (eval mode, on CPU until moved).
    name : the model specification as given (card path or torchvision name).
    weights : the weights specification (``none``, an enum name, or a file path).
    input_size : ``(H, W)`` the weights expect.
    mean, std : per-channel normalization of ``[0, 1]`` RGB input.
    fingerprint : SHA-256 identifying architecture and weights (keys caches).
    """

    module: nn.Module
    name: str
    weights: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str

    def to_tensor(self, img: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """RGB PIL image → normalized ``(3, H, W)`` float32 tensor.

        ``size`` ``(H, W)`` resizes (bilinear, aspect ratio not kept); ``None`` keeps the image size.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def describe(self) -> dict:
        return {
            "model": self.name,
            "weights": self.weights,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "fingerprint": self.fingerprint,
        }


def netdissect_tensor(img: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """NetDissect-Lite's Caffe-style input: RGB→BGR, subtract the BGR mean, back to RGB, / (255·0.224)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)[:, :, ::-1]
    a = a - np.array([109.5388, 118.6897, 124.6901], dtype=np.float32)
    a = a[:, :, ::-1] / np.float32(255 * 0.224)
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


# -- model cards ------------------------------------------------------------------------------
def _card_path(spec: str) -> Path | None:
    p = Path(spec)
    if p.is_dir() and (p / "model.json").exists():
        return p / "model.json"
    if p.suffix == ".json" and p.exists():
        return p
    if p.suffix == ".json" or os.sep in spec:
        raise ModelError(f"model card not found: {spec} (expected a model.json or a folder holding one)")
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # SafetensorError, OSError: truncated, corrupt or not safetensors
            raise ModelError(f"cannot read weights {path}: not a complete .safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"cannot load weights {path} with weights_only=True ({e})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ModelError(f"{path} does not hold a state_dict")
    # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_state(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = module.state_dict()
    for k, want in own.items():  # in the module's own order, so the first layer at fault is named
        if k in sd and tuple(sd[k].shape) != tuple(want.shape):
            raise ModelError(
                f"{source}: shape mismatch at {k!r}: file has {tuple(sd[k].shape)}, model expects {tuple(want.shape)}"
            )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"{source}: state_dict does not match the architecture "
            f"(missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''})"
        )
    module.load_state_dict(sd)


def save_model_card(
    folder: str | os.PathLike,
    module: nn.Module,
    architecture: str,
    num_classes: int,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    arch_kwargs: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Save ``module``'s weights as safetensors and a ``model.json`` card next to them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(weights))
    card = {
        "format": CARD_FORMAT,
        "version": 1,
        "architecture": architecture,
        "arch_kwargs": arch_kwargs or {},
        "num_classes": int(num_classes),
        "input_size": [int(s) for s in input_size],
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
    }
    if extra:
        card.update(extra)
    path = folder / "model.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


MAX_CLASSES = 1_000_000
MAX_INPUT_SIDE = 4096
ALLOW_EXTERNAL_WEIGHTS_ENV = "CONCEPTRANK_ALLOW_EXTERNAL_WEIGHTS"


@dataclass(frozen=True)
class ModelCard:
    """The checked fields of a ``model.json`` (see :func:`read_model_card`)."""

    path: Path
    architecture: str
    arch_kwargs: dict
    num_classes: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    weights_sha256: str | None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _card_numbers(path: Path, card: dict, key: str, n: int, low: float, high: float) -> tuple:
    vals = card[key] if key != "mean" and key != "std" else card["normalization"].get(key)
    ok = isinstance(vals, list) and len(vals) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in vals)
    if not ok:
        raise ModelError(f"model card {path}: field {key!r} must be a list of {n} numbers in [{low:g}, {high:g}], "
                         f"got {vals!r}")
    return tuple(vals)


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """Read and check a model card: every field's type and range, before anything is built.

    Raises
    ------
    ModelError
        Naming the card and the field at fault (missing, wrong type, out of range, unknown key).
    """
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model card {path} is not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise ModelError(f"model card {path} must hold a JSON object")
    for key in ("architecture", "num_classes", "input_size", "normalization", "weights"):
        if key not in card:
            raise ModelError(f"model card {path} lacks the field {key!r}")
    if "format" in card and card["format"] != CARD_FORMAT:
        raise ModelError(f"model card {path}: field 'format' must be {CARD_FORMAT!r}, got {card['format']!r}")
    if not isinstance(card["architecture"], str) or not card["architecture"]:
        raise ModelError(f"model card {path}: field 'architecture' must be a name, got {card['architecture']!r}")
    n = card["num_classes"]
    if not _is_int(n) or not 1 <= n <= MAX_CLASSES:
        raise ModelError(f"model card {path}: field 'num_classes' must be an integer in [1, {MAX_CLASSES}], got {n!r}")
    size = card["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 1 <= v <= MAX_INPUT_SIDE for v in size)):
        raise ModelError(f"model card {path}: field 'input_size' must be [height, width] in pixels, "
                         f"each in [1, {MAX_INPUT_SIDE}], got {size!r}")
    if not isinstance(card["normalization"], dict):
        raise ModelError(f"model card {path}: field 'normalization' must be an object with 'mean' and 'std'")
    mean = _card_numbers(path, card, "mean", 3, -1e3, 1e3)
    std = _card_numbers(path, card, "std", 3, 1e-6, 1e3)
    kwargs = card.get("arch_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ModelError(f"model card {path}: field 'arch_kwargs' must be an object, got {kwargs!r}")
    if not isinstance(card["weights"], str) or not card["weights"].strip():
        raise ModelError(f"model card {path}: field 'weights' must be a file name, got {card['weights']!r}")
    sha = card.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ModelError(f"model card {path}: field 'weights_sha256' must be 64 hex digits, got {sha!r}")
    return ModelCard(path, card["architecture"], kwargs, n, (size[0], size[1]), mean, std, card["weights"], sha)


def _build_card_module(card: ModelCard) -> nn.Module:
    import inspect

    from conceptrank.nn.nets import ARCHITECTURES

    if card.architecture not in ARCHITECTURES:
        if card.arch_kwargs:
            raise ModelError(f"model card {card.path}: field 'arch_kwargs' applies only to conceptrank architectures "
                             f"({', '.join(ARCHITECTURES)}), not {card.architecture!r}")
        with torch.random.fork_rng(devices=[]):
            return _torchvision_arch(card.architecture, num_classes=card.num_classes)
    cls = ARCHITECTURES[card.architecture]
    params = inspect.signature(cls).parameters
    allowed = [k for k in params if k != "num_classes"]
    unknown = sorted(set(card.arch_kwargs) - set(allowed))
    if unknown:
        raise ModelError(f"model card {card.path}: unknown arch_kwargs {unknown} for {card.architecture!r}; "
                         f"it accepts {allowed}")
    for k, v in card.arch_kwargs.items():
        default = params[k].default
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ModelError(f"model card {card.path}: arch_kwargs.{k} must be true or false, got {v!r}")
        if _is_int(default) and not (_is_int(v) and 0 <= v <= 4096):
            raise ModelError(f"model card {card.path}: arch_kwargs.{k} must be an integer in [0, 4096], got {v!r}")
    try:
        with torch.random.fork_rng(devices=[]):  # building initializes weights: keep the caller's RNG as it was
            return cls(num_classes=card.num_classes, **card.arch_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"model card {card.path}: cannot build {card.architecture!r} from arch_kwargs "
                         f"{card.arch_kwargs} ({e})") from None


def _card_weights(card: ModelCard) -> Path:
    """The card's weights file, confined to the card's folder unless explicitly allowed."""
    folder = card.path.parent.resolve()
    wfile = (card.path.parent / card.weights).resolve()
    allowed = os.environ.get(ALLOW_EXTERNAL_WEIGHTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if folder not in wfile.parents and not allowed:
        raise ModelError(
            f"model card {card.path}: weights {card.weights!r} lie outside the card's folder {folder}; "
            f"pass --weights {wfile} to use that file explicitly (or set {ALLOW_EXTERNAL_WEIGHTS_ENV}=1)")
    return card.path.parent / card.weights


def _load_card(path: Path, weights: str | None) -> LoadedModel:
    card = read_model_card(path)
    module = _build_card_module(card)
    explicit = weights not in (None, "", "card")
    wfile = Path(weights) if explicit else _card_weights(card)
    if explicit and not wfile.is_absolute() and not wfile.exists():
        wfile = path.parent / wfile
    if not wfile.is_file():
        raise ModelError(f"weights file not found: {wfile}" + ("" if explicit else f" (named by {path})"))
    digest = file_sha256(wfile)
    if not explicit and card.weights_sha256 is not None and digest != card.weights_sha256:
        raise ModelError(
            f"weights {wfile} have SHA-256 {digest[:16]}…, but {path} records {card.weights_sha256[:16]}…: "
            "the file was changed or replaced; restore it, or pass --weights to use it anyway")
    sd = _read_state_dict(wfile)
    _load_state(module, sd, str(wfile))
    module.eval()
    return LoadedModel(
        module=module,
        name=str(path),
        weights=str(wfile),
        input_size=card.input_size,
        mean=tuple(float(m) for m in card.mean),
        std=tuple(float(s) for s in card.std),
        fingerprint=hash_json({"architecture": card.architecture, "kwargs": card.arch_kwargs, "weights": digest}),
    )


# -- torchvision --------------------------------------------------------------------------------
def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_torchvision_name(name: str) -> None:
    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}: neither a model card (model.json) nor a torchvision classification "
            f"model.{hint}"
        )


def _torchvision_arch(name: str, num_classes: int | None = None) -> nn.Module:
    import torchvision

    _check_torchvision_name(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _load_torchvision(name: str, weights: str | None) -> LoadedModel:
    import torchvision

    if weights is None:
        _check_torchvision_name(name)
        raise ModelError(
            f"torchvision model {name!r} needs weights (--weights): a weights enum such as DEFAULT or "
            "IMAGENET1K_V1, a state_dict file, or 'none' for random init"
        )
    wspec = weights.strip()
    if wspec.lower() == "none":
        with torch.random.fork_rng(devices=[]):  # random init, reproducible, caller's RNG untouched
            torch.manual_seed(0)
            module = _torchvision_arch(name)
        module.eval()
        return LoadedModel(
            module, name, "none", (224, 224), IMAGENET_MEAN, IMAGENET_STD,
            hash_json({"torchvision": name, "weights": "none", "seed": 0}),
        )
    path = Path(wspec)
    if path.suffix in (".pth", ".pt", ".safetensors", ".bin", ".ckpt") or path.exists():
        with torch.random.fork_rng(devices=[]):
            module = _torchvision_arch(name)
        sd = _read_state_dict(path)
        _load_state(module, sd, str(path))
        module.eval()
        return LoadedModel(
            module, name, str(path), (224, 224), IMAGENET_MEAN, IMAGENET_STD,
            hash_json({"torchvision": name, "weights": file_sha256(path)}),
        )
    with torch.random.fork_rng(devices=[]):
        module = _torchvision_arch(name)
    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except Exception as e:  # pragma: no cover - torchvision always has weights enums for listed models
        raise ModelError(f"no weights enum for {name}: {e}") from None
    if wspec == "DEFAULT":
        w = enum_cls.DEFAULT
    else:
        try:
            w = enum_cls[wspec.split(".")[-1]]
        except KeyError:
            raise ModelError(
                f"unknown weights {wspec!r} for {name}; choose one of "
                f"{[m.name for m in enum_cls] + ['DEFAULT', 'none', 'a local state_dict file']}"
            ) from None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    fname = os.path.basename(w.url)
    file = hub / fname
    if not file.exists():
        raise ModelError(
            f"weights {name} {w.name} are not available offline: place the file {fname} in {hub} "
            f"(download it from {w.url} on a machine with network access), or pass --weights PATH "
            "to a local state_dict file. conceptrank never downloads weights itself."
        )
    sd = _read_state_dict(file)
    _load_state(module, sd, str(file))
    module.eval()
    t = w.transforms()
    size = int(getattr(t, "crop_size", [224])[0])
    return LoadedModel(
        module, name, w.name, (size, size), tuple(t.mean), tuple(t.std),
        hash_json({"torchvision": name, "weights": file_sha256(file)}),
    )


def load_model(model: str, weights: str | None = None) -> LoadedModel:
    """Load a model card or a torchvision model with its preprocessing.

    Parameters
    ----------
    model : path to a model card (``model.json`` or its folder) or a torchvision model name.
    weights : for torchvision: an enum name (``DEFAULT``, ``IMAGENET1K_V1``), a state_dict file, or
        ``none``; for a card: optional override of the card's weights file.
    """
    card = _card_path(model)
    if card is not None:
        return _load_card(card, weights)
    return _load_torchvision(model, weights)


def list_layers(loaded: LoadedModel, size: tuple[int, int] | None = None) -> list[tuple[str, str, tuple]]:
    """Every submodule's dotted name, class name and output shape for one sample input.

    Returns ``[(name, class, shape)]``; shape is ``()`` for modules the sample does not reach.
    """
    from conceptrank.nn.hooks import layer_names, output_shapes

    names = layer_names(loaded.module)
    h, w = size or loaded.input_size
    with torch.no_grad():
        out = output_shapes(loaded.module, torch.zeros(1, 3, h, w))
    modules = dict(loaded.module.named_modules())
    first = {n: v[0] for n, v in out.items() if isinstance(v[0], tuple)}
    return [(n, type(modules[n]).__name__, first.get(n, ())) for n in names]
