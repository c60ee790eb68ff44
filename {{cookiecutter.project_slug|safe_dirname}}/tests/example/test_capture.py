"""The capture rig: BOP layout, labels exact to the pose, determinism, atomic writes, clear config errors."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_IMAGES, compose
from {{ cookiecutter.package_name }}.data import bop, capture, qa

FEW = ["data.capture.num_images.train=3", "data.capture.num_images.val=1", "data.capture.num_images.test=1"]


def read(path):
    return np.array(Image.open(path))


def test_bop_layout_and_keys(tiny_dataset):
    root = tiny_dataset.root
    assert {p.name for p in (root / "models").iterdir()} >= {
        "models_info.json",
        "obj_000001.ply",
        "obj_000002.ply",
    }
    camera = json.loads((root / "camera.json").read_text())
    assert camera == {
        "cx": 15.5,
        "cy": 15.5,
        "fx": 40.0,
        "fy": 40.0,
        "width": 32,
        "height": 32,
        "depth_scale": 0.1,
    }
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        scene = root / split / "000000"
        gt = json.loads((scene / "scene_gt.json").read_text())
        cam = json.loads((scene / "scene_camera.json").read_text())
        info = json.loads((scene / "scene_gt_info.json").read_text())
        assert list(gt) == list(cam) == list(info) == [str(i) for i in range(n)]
        assert set(gt["0"][0]) == {"cam_R_m2c", "cam_t_m2c", "obj_id"} and len(gt["0"][0]["cam_R_m2c"]) == 9
        assert set(cam["0"]) == {"cam_K", "depth_scale"}
        assert set(info["0"][0]) == {
            "bbox_obj", "bbox_visib", "px_count_all", "px_count_valid", "px_count_visib", "visib_fract",
        }  # fmt: skip
        assert len(list((scene / "rgb").glob("*.png"))) == n
        rgb, depth = read(scene / "rgb/000000.png"), read(scene / "depth/000000.png")
        assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
        assert depth.dtype == np.uint16 and depth.shape == (32, 32)
        for sub in ("mask", "mask_visib"):
            mask = read(scene / sub / "000000_000000.png")
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_labels_agree_with_the_pose(tiny_dataset):
    """Project the model with K [R|t]: the rendered mask, depth and gt_info must agree with it."""
    root = tiny_dataset.root
    scene = root / "train" / "000000"
    gt = json.loads((scene / "scene_gt.json").read_text())
    cam = json.loads((scene / "scene_camera.json").read_text())
    info = json.loads((scene / "scene_gt_info.json").read_text())
    verts, faces, _ = bop.read_ply(root / "models" / "obj_000001.ply")
    surface = bop.sample_surface(verts, faces, 4000)
    diameter = json.loads((root / "models" / "models_info.json").read_text())["1"]["diameter"]
    cap = compose(*tiny_dataset.overrides).data.capture
    occluded, with_occluders = set(), set()
    for key in gt:
        R = np.array(gt[key][0]["cam_R_m2c"]).reshape(3, 3)
        t = np.array(gt[key][0]["cam_t_m2c"])
        K = np.array(cam[key]["cam_K"]).reshape(3, 3)
        im = int(key)
        # the view's scene, replayed from its random stream (seed, split 0 = train, im_id) as capture drew it
        rng = np.random.default_rng([int(cap.seed), 0, im])
        replayed_t = capture.sample_translation(rng, verts @ R.T, K, 32, cap.distance_mm, cap.margin_px)
        assert np.allclose(replayed_t, t)
        near_z = float((verts @ R.T + t)[:, 2].min())
        if capture.sample_occluders(rng, cap.occluders, t, near_z, diameter, np.eye(3)):
            with_occluders.add(key)
        mask = read(scene / f"mask/{im:06d}_000000.png") > 0
        visib = read(scene / f"mask_visib/{im:06d}_000000.png") > 0
        depth = read(scene / f"depth/{im:06d}.png") * cam[key]["depth_scale"]
        # surface points projected with K [R|t] fall in the mask (1 px tolerance for pixel rounding) ...
        uvw = (surface @ R.T + t) @ K.T
        u, v = np.round(uvw[:, :2] / uvw[:, 2:]).astype(int).T
        grown = (
            torch.nn.functional.max_pool2d(torch.from_numpy(mask).float()[None, None], 3, 1, 1)[0, 0].numpy()
            > 0
        )
        assert grown[v, u].mean() >= 0.98
        # ... and cover it: every mask pixel has a projected point within 1 px
        hits = np.zeros_like(mask)
        hits[v, u] = True
        hits = (
            torch.nn.functional.max_pool2d(torch.from_numpy(hits).float()[None, None], 3, 1, 1)[0, 0].numpy()
            > 0
        )
        assert (hits & mask).sum() >= 0.98 * mask.sum()
        # the model rasterized at pixel centres: same silhouette, same depth (0.1 mm quantization)
        rendered = qa.rasterize(verts @ R.T + t, faces, K, 32, 32)
        assert qa.iou(rendered > 0, mask) >= 0.98
        both = visib & (rendered > 0)
        assert np.abs(depth[both] - rendered[both]).max() < 0.5
        assert (visib <= mask).all()
        # what the mask has and mask_visib lacks is hidden by something nearer than the object there
        hidden = mask & ~visib & (rendered > 0)
        assert (depth[hidden] > 0).all() and (depth[hidden] < rendered[hidden]).all()
        record = info[key][0]
        assert record["px_count_all"] == mask.sum() and record["px_count_visib"] == visib.sum()
        assert record["visib_fract"] == pytest.approx(visib.sum() / mask.sum())
        ys, xs = np.nonzero(mask)
        assert record["bbox_obj"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        if record["visib_fract"] < 1:
            occluded.add(key)
    # only views given occluders are occluded, and most of those (an occluder may miss the silhouette);
    # occluders.probability 0.25 gave 16 train views some of each
    assert occluded <= with_occluders and len(occluded) >= 0.5 * len(with_occluders), (
        occluded,
        with_occluders,
    )
    assert 0 < len(with_occluders) < len(gt)


def test_same_seed_same_dataset(tmp_path):
    def run(name, *extra):
        root = tmp_path / name
        capture.capture(compose(f"data.root={root}", *TINY_IMAGES, *FEW, "logger=none", *extra))
        return root

    a, b, c = run("a"), run("b"), run("c", "data.capture.seed=1")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 20
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train/000000/scene_gt.json").read_bytes() != (c / "train/000000/scene_gt.json").read_bytes()
    # splits come from separate random streams: no pose shared between train and test
    train = json.loads((a / "train/000000/scene_gt.json").read_text())
    test = json.loads((a / "test/000000/scene_gt.json").read_text())
    assert not {str(v[0]["cam_t_m2c"]) for v in train.values()} & {
        str(v[0]["cam_t_m2c"]) for v in test.values()
    }


@pytest.mark.slow
def test_worker_processes_give_the_same_dataset(tmp_path):
    def run(name, workers):
        root = tmp_path / name
        cfg = compose(
            f"data.root={root}", *TINY_IMAGES, *FEW, "logger=none", f"data.capture.workers={workers}"
        )
        capture.capture(cfg)
        return root

    a, b = run("inline", 0), run("pool", 2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_failed_capture_leaves_the_old_dataset_or_nothing(tmp_path, monkeypatch):
    root = tmp_path / "dataset"
    cfg = compose(f"data.root={root}", *TINY_IMAGES, *FEW, "logger=none")
    real_render = capture.Renderer.render
    calls = []

    def failing_render(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("renderer crashed")
        return real_render(self, *args)

    monkeypatch.setattr(capture.Renderer, "render", failing_render)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        capture.capture(cfg)
    assert list(tmp_path.iterdir()) == []  # no dataset, no half-written temp folder
    monkeypatch.setattr(capture.Renderer, "render", real_render)
    capture.capture(cfg)
    before = (root / "train/000000/scene_gt.json").read_bytes()
    monkeypatch.setattr(capture.Renderer, "render", failing_render)
    calls.clear()
    with pytest.raises(RuntimeError):
        capture.capture(
            compose(f"data.root={root}", *TINY_IMAGES, *FEW, "logger=none", "data.capture.seed=5")
        )
    assert (root / "train/000000/scene_gt.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_capture_after_a_sigkill_sweeps_the_killed_captures_temp_folder(tmp_path, capsys):
    """SIGKILL leaves `2_data/.dataset.<random>` behind (nothing can clean up); the next capture removes
    it and says so, and leaves alone what is not a dead capture's: a live one's, another name's, .old."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "WANDB_MODE": "offline"}
    many = ["data.capture.num_images.train=2000", "data.capture.workers=0"]
    cmd = [sys.executable, "-m", "{{ cookiecutter.package_name }}.data.capture", f"paths.root={tmp_path}",
           "logger=none", *TINY_IMAGES, *many]  # fmt: skip
    data = tmp_path / "2_data"
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:  # until it renders into its temp folder
        if list(data.glob(".dataset.*/train/000000/rgb/*.png")):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    [stale] = data.glob(".dataset.*")
    assert (stale / capture.OWNER_FILE).read_text() == str(process.pid)
    # not a dead capture's of this dataset: a running capture's, another dataset's, the swap's .old
    live = data / ".dataset.live0001"
    (live).mkdir()
    (live / capture.OWNER_FILE).write_text(str(os.getpid()))
    other = data / ".other.dead0001"
    other.mkdir()
    (other / capture.OWNER_FILE).write_text(str(process.pid))
    (data / ".dataset.old").mkdir()

    capture.capture(compose(f"data.root={data / 'dataset'}", *TINY_IMAGES, *FEW, "logger=none"))
    assert f"removed {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in data.iterdir()) == [
        ".dataset.live0001",
        ".dataset.old",
        ".other.dead0001",
        "dataset",
    ]
    assert len(bop.BopDataset(data / "dataset", "train", obj_id=1)) == 3
    assert not list((data / "dataset").rglob(capture.OWNER_FILE))


def test_symmetric_object(tmp_path):
    root = tmp_path / "sym"
    capture.capture(compose(f"data.root={root}", *TINY_IMAGES, *FEW, "logger=none", "data.obj_id=2"))
    gt = json.loads((root / "train/000000/scene_gt.json").read_text())
    assert {v[0]["obj_id"] for v in gt.values()} == {2}
    assert len(bop.BopDataset(root, "train", obj_id=2)) == 3


def test_off_centre_principal_point(tmp_path):
    """Masks and depth agree with the pose (label QA) when the principal point is not the image centre."""
    root = tmp_path / "pp"
    cfg = compose(f"data.root={root}", "data.camera.cx=26.0", "data.camera.cy=35.0", *FEW, "logger=none")
    capture.capture(cfg)
    assert json.loads((root / "camera.json").read_text())["cx"] == 26.0
    issues, _, n_instances = qa.run_qa(root, ["train", "val", "test"], qa.qa_settings(cfg))
    assert n_instances == 5 and {check: found for check, found in issues.items() if found} == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.camera.fy=81", r"data.camera: fx \(80.0\) != fy \(81.0\)"),
        ("data.capture.distance_mm=[20,30]", r"data.capture.distance_mm \[20, 30\]: the object does not fit"),
        ("data.capture.num_images.val=0", r"data.capture.num_images.val: must be >= 1"),
        ("data.capture.objects=[9]", r"data.capture.objects: \[9\] not in .*models_info.json"),
    ],
)
def test_bad_config_is_named(tmp_path, override, message):
    cfg = compose(f"data.root={tmp_path / 'd'}", *TINY_IMAGES, *FEW, "logger=none", override)
    with pytest.raises(capture.CaptureError, match=message):
        capture.capture(cfg)
    assert not (tmp_path / "d").exists()


def test_command_reports_rate_and_fails_cleanly(tmp_path, monkeypatch, capsys):
    """`python -m <pkg>.data.capture ...`, run in-process (argv as Hydra reads it)."""
    argv = ["capture", f"paths.root={tmp_path}", "logger=none", *TINY_IMAGES, *FEW]
    monkeypatch.setattr(sys, "argv", argv)
    capture.main()
    assert "images/s" in capsys.readouterr().out
    assert (tmp_path / "2_data/dataset/test/000000/rgb/000000.png").exists()
    monkeypatch.setattr(sys, "argv", [*argv, "data.camera.fy=1"])
    with pytest.raises(SystemExit) as exit_info:
        capture.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "capture failed: data.camera: fx (80.0) != fy (1.0); the mitsuba pinhole has square pixels"
    ]
