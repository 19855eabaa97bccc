"""Layer maps of chosen target images, recomputed with a run's model (for explain, relations, rules)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from conceptrank.errors import ConceptrankError

__all__ = ["layer_maps"]


def layer_maps(run_cfg: dict, extract_meta: dict, rels: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Rerun the model on images: per image its (U, h, w) layer maps and its resized RGB array."""
    import torch

    from conceptrank.io.images import load_rgb
    from conceptrank.io.targets import TargetSet, load_targets
    from conceptrank.nn.hooks import record_layers
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
    maps, pics, notes = [], [], []
    module = loaded.module.eval()
    for rel in rels:
        img = load_rgb(image_root.joinpath(*PurePosixPath(rel).parts))
        if crop == "person":
            from conceptrank.stages.extract import _crop_person

            img = _crop_person(img, str(image_root), rel, 1)
        x = loaded.to_tensor(img, size)[None]
        with torch.inference_mode(), record_layers(module, [layer]) as store:
            module(x)
            a = store[layer][0].float().cpu().numpy()
        if a.ndim == 1:
            a = a[:, None, None]
        maps.append(a.astype(np.float64))
        resized = img.resize((size[1], size[0]))
        pics.append(np.asarray(resized))
    return maps, pics, notes
