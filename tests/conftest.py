"""Shared fixtures: small synthetic worlds (session-scoped, built once per test run)."""

from __future__ import annotations

import pytest

from conceptrank.synthetic.build import build_world
from conceptrank.synthetic.train import TrainConfig
from conceptrank.synthetic.world import generate_world


@pytest.fixture(scope="session")
def tiny_world_nomodel(tmp_path_factory):
    """A small synthetic world without a model: 32 px, 60 probe images, 10 classes x 10 images.

    Returns the :class:`conceptrank.synthetic.world.WorldInfo` (``probe_dir``, ``target_dir``,
    ``truth_path``; ``model_dir`` is None).
    """
    out = tmp_path_factory.mktemp("world_nomodel") / "world"
    return generate_world(out, seed=3, size=32, probe_images=60, images_per_class=10, progress=False)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small synthetic world with a quickly trained source model (a few seconds).

    32 px images (``layer4`` is 4x4 with 128 units), 80 probe images, 10 classes x 10 images, and a
    WorldNet trained here on 384 source images for 2 epochs (barely better than chance: it is there to
    exercise training and the pipeline, not to find good detectors). ``model_dir`` holds the model card.
    """
    out = tmp_path_factory.mktemp("world") / "world"
    return build_world(
        out, seed=1, size=32, probe_images=80, images_per_class=10, model="retrain", progress=False,
        config=TINY_CONFIG,
    )


#: Training settings of ``tiny_world``'s model (seconds, not minutes).
TINY_CONFIG = TrainConfig(train_images=384, epochs=2, heldout_images=64)
