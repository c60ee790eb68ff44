"""Shared test fixtures.

`compose(*overrides)` builds the project's Hydra config the way every stage command does.
`tiny_dataset` renders one small synthetic BOP dataset per test session (16/8/8 images at 32 px) and
gives the overrides that point any stage at it (`scene_dataset`: the same for a tiny scene capture):

    def test_something(tiny_dataset, tmp_path):
        cfg = compose(*tiny_dataset.overrides, f"paths.root={tmp_path}", "experiment=smoke")
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from {{ cookiecutter.package_name }}.paths import CONFIG_DIR

# 32 px images (capture scales the camera of configs/data/synthetic.yaml to them)
TINY_IMAGES = ["data.image_size=32"]
# a tiny scene capture (data=scenes): 2 train + 1 val + 1 test scenes x 3 frames x 3 objects at 160x120
SCENE_SIZE = (160, 120)
SCENE_TINY = [
    "data=scenes",
    f"data.scenes.image_size=[{SCENE_SIZE[0]},{SCENE_SIZE[1]}]",
    "data.scenes.num_scenes.train=2",
    "data.scenes.num_scenes.val=1",
    "data.scenes.num_scenes.test=1",
    "data.scenes.images_per_scene=3",
    "data.scenes.instances=[3,3]",
    "data.scenes.spp=1",
    "data.scenes.workers=0",
    "logger=none",
]


def compose(*overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def capture_dataset(tmp_path_factory, name, train, val, test, *overrides):
    """Render a train/val/test dataset into a fresh folder; returns its root."""
    from {{ cookiecutter.package_name }}.data import capture

    root = tmp_path_factory.mktemp(name) / "dataset"
    counts = [
        f"data.capture.num_images.{k}={n}" for k, n in {"train": train, "val": val, "test": test}.items()
    ]
    capture.capture(compose(f"data.root={root}", *overrides, *counts, "logger=none"))
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A rendered 16/8/8-image dataset; `.overrides` select it (data.root and image size), `.root` is it."""
    root = capture_dataset(tmp_path_factory, "tiny_dataset", 16, 8, 8, *TINY_IMAGES)
    return SimpleNamespace(root=Path(root), overrides=[f"data.root={root}", *TINY_IMAGES])


@pytest.fixture(scope="session")
def scene_dataset(tmp_path_factory):
    """SCENE_TINY rendered through the capture command; `.overrides` select it, `.root` is it, `.cfg` its config."""
    from {{ cookiecutter.package_name }}.data import capture

    root = tmp_path_factory.mktemp("scenes") / "dataset"
    overrides = [*SCENE_TINY, f"data.root={root}"]
    argv = sys.argv
    sys.argv = ["capture", *overrides, f"paths.root={root.parent}", f"hydra.run.dir={root.parent / 'hydra'}"]
    try:
        capture.main()  # data=scenes: the capture command renders scenes
    finally:
        sys.argv = argv
    return SimpleNamespace(root=root, overrides=overrides, cfg=compose(*overrides))
