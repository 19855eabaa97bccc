"""Build the synthetic world with its source model: the world's files first, then the model.

The model is the one shipped with the package (``conceptrank/synthetic/model/``: safetensors weights,
``model.json`` card and a human-readable ``MODEL_CARD.md``) whenever it fits the world, and trained
here otherwise (saying why). It fits when the world's image size equals the one it was trained at and
the renderer still draws the same source images it was trained on (``source_fingerprint``). The
world's seed does not matter: the source task's images come from the same distribution for every
seed, so a model trained on seed 0's source images serves the worlds of all seeds.

``make model`` (``conceptrank synth --retrain --ship-model``) regenerates the shipped model with the
project's own training code and records the command, seed and code version in its card.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Literal, Mapping

from conceptrank.errors import ConceptrankError
from conceptrank.synthetic.knowledge import write_knowledge
from conceptrank.synthetic.train import TrainConfig, source_fingerprint, train_source_model
from conceptrank.synthetic.world import WorldInfo, generate_world

__all__ = ["SHIPPED_MODEL_DIR", "ModelChoice", "shipped_model_fits", "code_version", "build_world", "ship_model"]

#: Where the shipped source model lives inside the package.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "model"
#: ``auto``: the shipped model when it fits, else train; ``retrain``: always train; ``none``: no model.
ModelChoice = Literal["auto", "retrain", "none"]
_MODEL_FILES = ("model.json", "weights.safetensors", "MODEL_CARD.md")


def _shipped_card() -> dict | None:
    try:
        return json.loads((SHIPPED_MODEL_DIR / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shipped_model_fits(size: int, config: TrainConfig | None = None) -> tuple[bool, str]:
    """Whether the shipped model is the one :func:`train_source_model` would train for ``size``.

    Returns ``(fits, reason)``; ``reason`` says what differs when it does not fit.
    """
    card = _shipped_card()
    if card is None or not (SHIPPED_MODEL_DIR / "weights.safetensors").is_file():
        return False, f"no shipped model in {SHIPPED_MODEL_DIR}"
    task = card.get("source_task", {})
    if task.get("size") != size:
        return False, f"the shipped model was trained on {task.get('size')} px images, this world is {size} px"
    if task.get("config") != (config or TrainConfig()).to_json():
        return False, "the training settings differ from the shipped model's"
    if task.get("world_fingerprint") != source_fingerprint(int(task.get("seed", 0)), size):
        return False, "the renderer draws different source images than the shipped model was trained on"
    return True, "fits"


def code_version() -> str:
    """The git commit of the package's checkout (``+dirty`` with uncommitted changes), else its version."""
    from conceptrank import __version__

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"conceptrank {__version__}"
    return f"conceptrank {__version__} git {commit}{'+dirty' if dirty else ''}"


def _copy_shipped(dest: Path) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        if (SHIPPED_MODEL_DIR / name).is_file():
            shutil.copyfile(SHIPPED_MODEL_DIR / name, dest / name)
    return json.loads((dest / "model.json").read_text(encoding="utf-8"))["source_task"]["heldout_accuracy"]


def build_world(
    out,
    *,
    seed: int = 0,
    size: int = 64,
    probe_images: int = 1200,
    images_per_class: int = 80,
    model: ModelChoice = "auto",
    config: TrainConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> WorldInfo:
    """Write the synthetic world (:func:`generate_world`) and its source model into ``out/model``.

    Parameters
    ----------
    out, seed, size, probe_images, images_per_class, progress
        As for :func:`conceptrank.synthetic.world.generate_world`.
    model : ``"auto"``, ``"retrain"`` or ``"none"``
        ``auto`` copies the shipped model when it fits (:func:`shipped_model_fits`) and trains
        otherwise; ``retrain`` always trains; ``none`` writes no model.
    config : TrainConfig, optional
        Training settings when a model is trained (default ``TrainConfig()``).
    echo : callable, optional
        Where to say which model the world got (default: stderr when ``progress``).

    Returns
    -------
    WorldInfo
        With ``model_dir``, ``source_accuracy`` and ``model_note`` set when there is a model.
    """
    if model not in ("auto", "retrain", "none"):
        raise ConceptrankError(f"model must be auto, retrain or none, got {model!r}")
    say = echo or ((lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None))
    info = generate_world(out, seed=seed, size=size, probe_images=probe_images,
                          images_per_class=images_per_class, progress=progress)
    write_knowledge(info.out, seed=info.seed, size=info.size, images_per_class=info.images_per_class)  # world's KG
    if model == "none":
        return info
    model_dir = info.out / "model"
    if model == "auto":
        fits, why = shipped_model_fits(info.size, config)
        if fits:
            say(f"[synth] using the shipped source model ({SHIPPED_MODEL_DIR})")
            return dataclasses.replace(info, model_dir=model_dir, source_accuracy=_copy_shipped(model_dir),
                                       model_note="worldnet, shipped")
        say(f"[synth] training the source model: {why} (a few minutes on 2 cores)")
    res = train_source_model(model_dir, seed=info.seed, size=info.size, config=config, progress=progress,
                             provenance=_provenance(info.seed))
    return dataclasses.replace(info, model_dir=model_dir, source_accuracy=dict(res.heldout_accuracy),
                               model_note="worldnet, trained here")


def _provenance(seed: int) -> dict:
    import torch

    return {"command": " ".join(["conceptrank"] + sys.argv[1:]) if sys.argv else "", "seed": seed,
            "code_version": code_version(), "torch": torch.__version__}


def ship_model(model_dir: Path, dest: Path = SHIPPED_MODEL_DIR) -> Path:
    """Install a freshly trained model card from ``model_dir`` as the shipped model (with MODEL_CARD.md)."""
    card = json.loads((Path(model_dir) / "model.json").read_text(encoding="utf-8"))
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "weights.safetensors"):
        shutil.copyfile(Path(model_dir) / name, dest / name)
    (dest / "MODEL_CARD.md").write_text(model_card_text(card), encoding="utf-8")
    return dest


def model_card_text(card: Mapping) -> str:
    """The human-readable card of a source model (what made it, how good it is)."""
    task, prov = card["source_task"], card.get("provenance", {})
    acc = ", ".join(f"{k} {v:.3f}" for k, v in task["heldout_accuracy"].items())
    cfg = task["config"]
    return (
        "# Source model of the synthetic concept world\n\n"
        f"- architecture: `{card['architecture']}` {json.dumps(card['arch_kwargs'])}, "
        f"{card['num_classes']} outputs, input {card['input_size'][0]} px\n"
        f"- trained by: `{prov.get('command', '?')}`\n"
        f"- code version: {prov.get('code_version', '?')} (torch {prov.get('torch', '?')})\n"
        f"- seed: {task['seed']}; images: {cfg['train_images']} train x {cfg['epochs']} epochs, "
        f"{cfg['heldout_images']} held out; bf16 autocast: {task['bf16_autocast']}\n"
        f"- held-out accuracy: {acc}\n"
        f"- weights: `{card['weights']}` (sha256 {card['weights_sha256']})\n\n"
        "The source task (`conceptrank.synthetic.train`): shape, colour, material and scene of each image's\n"
        f"largest object, the presence of every concept of the world, and on `layer4`'s first "
        f"{card['arch_kwargs'].get('concept_units', 0)} units\n"
        "(concept units) each concept's coverage of every cell. Regenerate with `make model`.\n"
    )
