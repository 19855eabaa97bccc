"""Layer maps of chosen target images, recomputed with a run's model (for explain, relations, rules)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np

from conceptrank.errors import ConceptrankError

__all__ = ["run_config", "layer_maps", "iter_layer_maps"]


def run_config(run: Path) -> dict:
    """The ``config`` section of ``run/run.json`` (what ``demo``/``run`` recorded), {} without one."""
    from conceptrank.io.cache import read_json

    path = Path(run) / "run.json"
    return (read_json(path).get("config") or {}) if path.is_file() else {}


@dataclass(frozen=True)
class _RunModel:
    loaded: object
    layer: str
    size: tuple[int, int]
    crop: str
    image_root: Path

    def image(self, rel: str):
        from conceptrank.io.images import load_rgb

        img = load_rgb(self.image_root.joinpath(*PurePosixPath(rel).parts))
        if self.crop == "person":
            from conceptrank.stages.extract import _crop_person

            img = _crop_person(img, str(self.image_root), rel, 1)
        return img

    def forward(self, x) -> np.ndarray:
        """(B, 3, H, W) → the layer's (B, U, h, w) float32 maps."""
        import torch

        from conceptrank.nn.hooks import record_layers

        module = self.loaded.module.eval()
        with torch.inference_mode(), record_layers(module, [self.layer]) as store:
            module(x)
            a = store[self.layer].float().cpu().numpy()
        return a[:, :, None, None] if a.ndim == 2 else a


def _run_model(run_cfg: dict, extract_meta: dict) -> _RunModel:
    from conceptrank.io.targets import TargetSet, load_targets
    from conceptrank.nn.models import load_model

    model_spec = run_cfg.get("model") or (extract_meta.get("model") or {}).get("model")
    weights = run_cfg.get("weights") if "model" in run_cfg else (extract_meta.get("model") or {}).get("weights")
    layer = extract_meta.get("layer") or run_cfg.get("layer")
    ds = extract_meta.get("dataset") or {}
    root = ds.get("root") or run_cfg.get("target")
    if not model_spec or not layer or not root:
        raise ConceptrankError("run.json / extract.json do not say which model, layer and dataset were used")
    loaded = load_model(str(model_spec), weights)
    size = tuple(int(s) for s in (extract_meta.get("input_size") or loaded.input_size))
    crop = (extract_meta.get("config") or {}).get("crop", "none")
    try:
        targets: TargetSet | None = load_targets(root, ds.get("layout") or "auto")
    except ConceptrankError:
        targets = None
    image_root = targets.image_root if targets is not None else Path(root)
    return _RunModel(loaded, str(layer), size, crop, image_root)


def layer_maps(run_cfg: dict, extract_meta: dict, rels: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Rerun the model on images: per image its (U, h, w) layer maps and its resized RGB array."""
    rm = _run_model(run_cfg, extract_meta)
    maps, pics, notes = [], [], []
    for rel in rels:
        img = rm.image(rel)
        a = rm.forward(rm.loaded.to_tensor(img, rm.size)[None])[0]
        maps.append(a.astype(np.float64))
        resized = img.resize((rm.size[1], rm.size[0]))
        pics.append(np.asarray(resized))
    return maps, pics, notes


def iter_layer_maps(run_cfg: dict, extract_meta: dict, rels: Sequence[str],
                    batch_size: int = 64) -> Iterator[tuple[int, np.ndarray, tuple[int, int]]]:
    """Rerun the model on images in batches: yields ``(start, maps (B, U, h, w) float32, input size)``."""
    import torch

    rm = _run_model(run_cfg, extract_meta)
    for start in range(0, len(rels), batch_size):
        x = torch.stack([rm.loaded.to_tensor(rm.image(r), rm.size) for r in rels[start:start + batch_size]])
        yield start, rm.forward(x), rm.size
