"""The scene capture (`make capture` with data=scenes): full frames with several objects, clutter and
occlusion in the BOP layout, labels that agree with the projected geometry, the detections file, and label
QA passing on it while flagging corrupted scene labels."""

import json
import shutil
import sys
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SCENE_SIZE, SCENE_TINY, compose
from {{ cookiecutter.package_name }} import evaluation, training
from {{ cookiecutter.package_name }}.data import bop, capture, detections, qa, render, scenes

W, H = SCENE_SIZE
TINY = SCENE_TINY
FOLDERS = {"train": "train_pbr", "val": "val", "test": "test"}


def read(path):
    return np.array(Image.open(path))


def frames(root):
    """(split folder, scene dir, im_id, scene_gt list, scene_camera entry, scene_gt_info list) per frame."""
    for folder in FOLDERS.values():
        for scene_dir in sorted((root / folder).iterdir()):
            gt = json.loads((scene_dir / "scene_gt.json").read_text())
            cam = json.loads((scene_dir / "scene_camera.json").read_text())
            info = json.loads((scene_dir / "scene_gt_info.json").read_text())
            for key in gt:
                yield folder, scene_dir, int(key), gt[key], cam[key], info[key]


def test_bop_layout_several_instances_held_out_scenes(scene_dataset):
    root = scene_dataset.root
    assert {"models_info.json", "obj_000001.ply", "obj_000002.ply"} <= {
        p.name for p in (root / "models").iterdir()
    }
    camera = json.loads((root / "camera.json").read_text())
    assert (camera["width"], camera["height"], camera["depth_scale"]) == (W, H, 0.1)
    # the 640x480 camera of configs/data/scenes.yaml scaled by 1/4 (pixel centres at integer coordinates)
    assert camera["fx"] == camera["fy"] == pytest.approx(572.4 / 4)
    assert camera["cx"] == pytest.approx((325.3 + 0.5) / 4 - 0.5)
    scene_ids = {
        folder: sorted(int(p.name) for p in (root / folder).iterdir()) for folder in FOLDERS.values()
    }
    assert scene_ids == {"train_pbr": [0, 1], "val": [2], "test": [3]}  # held out: no scene in two splits
    n_frames = 0
    for _, scene_dir, im, gts, cam, infos in frames(root):
        n_frames += 1
        assert len(gts) == len(infos) == 3 and {"cam_R_m2c", "cam_t_m2c", "obj_id"} == set(gts[0])
        assert set(cam) == {"cam_K", "depth_scale"}
        assert set(infos[0]) == {
            "bbox_obj",
            "bbox_visib",
            "px_count_all",
            "px_count_valid",
            "px_count_visib",
            "visib_fract",
        }
        rgb, depth = read(scene_dir / f"rgb/{im:06d}.png"), read(scene_dir / f"depth/{im:06d}.png")
        assert rgb.shape == (H, W, 3) and depth.shape == (H, W) and depth.dtype == np.uint16
        for gt_id, sub in product(range(3), ("mask", "mask_visib")):
            mask = read(scene_dir / sub / f"{im:06d}_{gt_id:06d}.png")
            assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
    assert n_frames == 4 * 3


def box_mesh(half, rotation, centre):
    corners = np.array(list(product((-1, 1), repeat=3)), float) * half @ np.asarray(rotation).T + centre
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return corners, np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])


def sphere_depth(centre, radius, K):
    """z of the first hit of the ray through each pixel centre with a sphere, 0 = miss."""
    v, u = np.mgrid[0:H, 0:W]
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones((H, W))], -1)  # z = 1
    a, b = (rays * rays).sum(-1), -2 * rays @ centre
    disc = b * b - 4 * a * (centre @ centre - radius**2)
    z = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    return np.where(disc > 0, z, 0.0)


def test_labels_agree_with_the_projected_geometry(scene_dataset):
    """Replay each frame's random stream (as the capture drew it) and compare every instance's labels with
    the scene's geometry: the model points projected with K [R|t], each object's and distractor's
    z-buffer (qa.rasterize, analytic spheres): mask_visib is where the instance's own surface is the
    nearest, bbox_obj holds all its projected points, visib_fract = visible / all pixels."""
    root, cfg = scene_dataset.root, scene_dataset.cfg
    renderer, obj_ids = scenes.renderer_for(cfg)
    models = {o: bop.read_ply(root / "models" / f"obj_{o:06d}.ply") for o in (1, 2)}
    occluded_by_object = occluded_by_clutter = 0
    for _, scene_dir, im, gts, cam, infos in frames(root):
        K = np.array(cam["cam_K"]).reshape(3, 3)
        rng = np.random.default_rng([int(cfg.data.scenes.seed), int(scene_dir.name), im])
        window = scenes.cluster_window(rng, cfg.data.scenes, (H, W))
        instances = scenes.sample_instances(rng, cfg.data.scenes, renderer, obj_ids, window)
        clutter = scenes.sample_clutter(rng, cfg.data.scenes, renderer, instances, window)
        assert [o for o, _, _ in instances] == [g["obj_id"] for g in gts]
        for (_, R, t), g in zip(instances, gts, strict=True):
            assert np.allclose(R.ravel(), g["cam_R_m2c"]) and np.allclose(t, g["cam_t_m2c"])
        own = []
        for g in gts:
            verts, faces, _ = models[g["obj_id"]]
            R, t = np.array(g["cam_R_m2c"]).reshape(3, 3), np.array(g["cam_t_m2c"])
            own.append(qa.rasterize(verts @ R.T + t, faces, K, H, W))
        hiders = []
        for kind, centre, size, _, rotation in clutter:
            if kind == "sphere":
                hiders.append(sphere_depth(centre, size / 2, K))
            else:
                hiders.append(qa.rasterize(*box_mesh(size / 2, rotation, centre), K, H, W))
        for gt_id, (g, info) in enumerate(zip(gts, infos, strict=True)):
            mask = read(scene_dir / f"mask/{im:06d}_{gt_id:06d}.png") > 0
            visib = read(scene_dir / f"mask_visib/{im:06d}_{gt_id:06d}.png") > 0
            depth = own[gt_id]
            assert (mask != (depth > 0)).sum() <= max(2, 0.02 * mask.sum())
            in_front = [d for i, d in enumerate(own) if i != gt_id]
            nearest_other = np.min([np.where(d > 0, d, np.inf) for d in in_front + hiders], axis=0)
            visible = (depth > 0) & (depth < nearest_other)
            assert (visib != visible).sum() <= max(2, 0.02 * mask.sum()), (scene_dir.name, im, gt_id)
            hidden = (depth > 0) & ~visible
            occluded_by_object += bool(
                (hidden & (np.min([np.where(d > 0, d, np.inf) for d in in_front], 0) < depth)).any()
            )
            occluded_by_clutter += bool(
                hiders and (hidden & (np.min([np.where(d > 0, d, np.inf) for d in hiders], 0) < depth)).any()
            )
            # bbox_obj is the mask's box and holds every projected model point (within 1.5 px: the box
            # counts the pixel centres the silhouette covers, a thin part between two centres is not in it)
            verts = models[g["obj_id"]][0]
            uvw = (verts @ np.array(g["cam_R_m2c"]).reshape(3, 3).T + g["cam_t_m2c"]) @ K.T
            u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
            assert info["bbox_obj"] == render.bbox(mask)
            x, y, w, h = info["bbox_obj"]
            assert x - 1.5 <= u.min() and u.max() <= x + w - 1 + 1.5, (u.min(), u.max(), x, w)
            assert y - 1.5 <= v.min() and v.max() <= y + h - 1 + 1.5, (v.min(), v.max(), y, h)
            assert u.min() >= 0 and u.max() <= W - 1 and v.min() >= 0 and v.max() <= H - 1  # inside the frame
            assert info["px_count_all"] == mask.sum() and info["px_count_visib"] == visib.sum()
            assert info["visib_fract"] == pytest.approx(visib.sum() / mask.sum())
            assert info["bbox_visib"] == render.bbox(visib)
    # the frames show mutual occlusion and occlusion by distractors
    assert occluded_by_object >= 3 and occluded_by_clutter >= 1, (occluded_by_object, occluded_by_clutter)


def test_preloaded_crops_decode_each_frame_once(scene_dataset):
    """Crop mode preloads whole frames, one per frame however many instances it holds (16,000 crops of a
    7,400-frame capture once took 24 GB and were killed), and every item is the one read lazily."""
    crop = {"pad": 1.5, "box": "visib", "shift": 0.0, "scale": 0.0}
    split = scene_dataset.cfg.data.splits.train
    lazy = bop.BopDataset(scene_dataset.root, split, obj_id=1, image_size=32, crop=crop)
    preloaded = bop.BopDataset(scene_dataset.root, split, obj_id=1, image_size=32, crop=crop, preload=True)
    frames = {item[3] for item in lazy.items}
    assert len(frames) < len(lazy)  # some frame holds the object twice
    assert preloaded.images.shape == (len(frames), 3, SCENE_SIZE[1], SCENE_SIZE[0])
    for a, b in zip(lazy, preloaded, strict=True):
        assert a["rgb_path"] == b["rgb_path"]
        for key in ("image", "K", "K_frame", "window", "R", "t"):
            assert torch.equal(a[key], b[key]), key


def test_detections_file_format(scene_dataset):
    root, cfg = scene_dataset.root, scene_dataset.cfg
    det = cfg.data.scenes.detections
    gt_count = 0
    for folder in FOLDERS.values():
        found = json.loads((root / "detections" / f"{folder}.json").read_text())
        ids = {(int(p.name), im) for p in (root / folder).iterdir() for im in range(3)}
        for d in found:
            assert set(d) == {"scene_id", "image_id", "category_id", "bbox", "score", "time"}
            assert (d["scene_id"], d["image_id"]) in ids and d["category_id"] in (1, 2)
            x, y, w, h = d["bbox"]
            assert w > 0 and h > 0 and x >= 0 and x + w <= W and y >= 0 and y + h <= H
            assert det.false_score[0] <= d["score"] <= det.score[1]
        gt_count += sum(
            1
            for _, s, _, _, _, infos in frames(root)
            if s.parent.name == folder
            for i in infos
            if i["visib_fract"] >= det.min_visib_fract
        )
        assert len(found) >= 1
    assert gt_count >= 20


def fake_frame(rng, n=4):
    boxes = [
        [
            float(x)
            for x in (rng.uniform(0, 100), rng.uniform(0, 70), rng.uniform(15, 40), rng.uniform(15, 40))
        ]
        for _ in range(n)
    ]
    return [{"obj_id": 1}] * n, [{"bbox_visib": b, "visib_fract": 0.8} for b in boxes]


def iou(a, b):
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax1, bx1) - max(a[0], b[0])) * max(0, min(ay1, by1) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize(
    "noise",
    [
        dict(jitter=0.0, drop=0.0, false_per_image=0.0),
        dict(jitter=0.15, drop=0.0, false_per_image=0.0),
        dict(jitter=0.0, drop=0.3, false_per_image=0.0),
        dict(jitter=0.0, drop=0.0, false_per_image=1.5),
    ],
    ids=["exact", "jitter", "drop", "false"],
)
def test_detection_noise_is_what_the_config_says(noise):
    """Over 400 frames of 4 boxes: jitter moves the boxes (IoU with GT < 1, mostly > 0.5), drop loses
    that share of instances, false_per_image adds that many false boxes per frame; none: the GT boxes."""
    det = compose(
        *TINY, *[f"data.scenes.detections.{k}={v}" for k, v in noise.items()]
    ).data.scenes.detections
    rng = np.random.default_rng(0)
    ious, missed, false, total = [], 0, 0, 0
    for im in range(400):
        gts, infos = fake_frame(rng)
        out = detections.detections_for(np.random.default_rng(im), det, 0, im, gts, infos, (H, W), [1, 2])
        true_boxes = [i["bbox_visib"] for i in infos]
        best = [max(iou(d["bbox"], b) for b in true_boxes) for d in out]
        # without jitter a true detection is its GT box (rounded to 0.01 px), otherwise all are true ones
        matched = [x for x in best if x > 0.98] if noise["jitter"] == 0 else best
        ious += matched
        false += len(best) - len(matched)
        missed += len(true_boxes) - len(matched)
        total += len(true_boxes)
    if noise["jitter"] > 0:
        assert 0.55 < np.median(ious) < 0.9 and max(ious) < 0.999
    assert missed / total == pytest.approx(noise["drop"], abs=0.05)
    assert false / 400 == pytest.approx(noise["false_per_image"], abs=0.2)


def test_qa_passes_and_flags_corrupted_scene_labels(scene_dataset, tmp_path):
    settings = qa.qa_settings(scene_dataset.cfg)
    issues, n_images, n_instances = qa.run_qa(scene_dataset.root, settings.splits, settings)
    assert (n_images, n_instances) == (12, 36)
    assert {check: found for check, found in issues.items() if found} == {}

    root = tmp_path / "dataset"
    shutil.copytree(scene_dataset.root, root)
    scene = root / "train_pbr" / "000000"
    info_path = scene / "scene_gt_info.json"
    info = json.loads(info_path.read_text())
    info["0"][1]["visib_fract"] = info["0"][1]["visib_fract"] * 0.5 + 0.01  # wrong visible fraction
    x, y, w, h = info["1"][2]["bbox_obj"]
    info["1"][2]["bbox_obj"] = [x + 5, y, w, h]  # a box shifted off the object
    info_path.write_text(json.dumps(info))
    # frame 2: instance 1 also claims the pixels where instance 0 is visible
    a, b = (read(scene / f"mask_visib/000002_{g:06d}.png") for g in (0, 1))
    Image.fromarray(np.maximum(a, b)).save(scene / "mask_visib/000002_000001.png")
    issues, _, _ = qa.run_qa(root, settings.splits, settings)
    flagged = {check: {(i["im_id"], i["gt_id"]) for i in found} for check, found in issues.items() if found}
    assert flagged["info_mismatch"] >= {(0, 1)} and flagged["bbox_mismatch"] == {(1, 2)}
    assert flagged["visib_overlap"] == {(2, 1)}
    assert "visib_fract" in issues["info_mismatch"][0]["detail"]


@pytest.mark.slow
def test_worker_processes_give_the_same_dataset(tmp_path):
    """Each frame has its own random stream: rendering in 2 worker processes writes the same bytes."""
    few = [*TINY, "data.scenes.images_per_scene=1"]
    digests = []
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        scenes.capture_scenes(compose(*few, f"data.root={root}", f"data.scenes.workers={workers}"))
        files = sorted(p for p in root.rglob("*") if p.is_file())
        digests.append({p.relative_to(root): p.read_bytes() for p in files})
    assert digests[0] == digests[1] and len(digests[0]) > 20


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.scenes.instances=[0,2]", "data.scenes.instances"),
        ("data.scenes.image_size=[160,100]", "aspect"),
        ("data.scenes.objects=[7]", "data.scenes.objects"),
        ("data.scenes.detections.drop=1.5", "data.scenes.detections.drop"),
        ("data.scenes.num_scenes.test=0", "data.scenes.num_scenes.test"),
        ("data.splits.val=test", "data.splits"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(capture.CaptureError, match=message.replace(".", r"\.")):
        scenes.validate(compose(*TINY, override))


def test_default_config_is_valid():
    cfg = compose("data=scenes", "logger=none")
    _, _, obj_ids = scenes.validate(cfg)
    assert obj_ids == [1, 2] and list(cfg.data.scenes.image_size) == [640, 480]


def test_user_models_folder(tmp_path):
    """A user's models/ folder: objects null places every model that has a PLY (models_info.json may list
    objects without one, as downloads do); asking for such an object is an error naming the key."""
    models = tmp_path / "models"
    shutil.copytree(render.ASSETS, models)
    info = json.loads((models / "models_info.json").read_text())
    info["3"] = dict(info["1"])  # listed, no obj_000003.ply
    (models / "models_info.json").write_text(json.dumps(info))
    _, _, obj_ids = scenes.validate(compose(*TINY, f"data.scenes.models_dir={models}"))
    assert obj_ids == [1, 2]
    with pytest.raises(capture.CaptureError, match=r"data\.scenes\.objects: \[3\] without a PLY"):
        scenes.validate(compose(*TINY, f"data.scenes.models_dir={models}", "data.scenes.objects=[1,3]"))


@pytest.mark.slow
def test_scenes_smoke_experiment_runs_capture_qa_train_evaluate(tmp_path):
    """`make capture qa train evaluate EXPERIMENT=scenes_smoke`, each command in-process: full frames with
    three objects, label QA passing, one epoch on zoom-in crops, test metrics."""
    argv = sys.argv
    try:
        for command in (capture.main, qa.main, training.main, evaluation.main):
            sys.argv = ["command", "experiment=scenes_smoke", f"paths.root={tmp_path}", "logger=none"]
            command()  # a failing stage exits (SystemExit)
    finally:
        sys.argv = argv
    assert sorted(p.name for p in (tmp_path / "2_data/dataset").iterdir()) == [
        "camera.json", "detections", "models", "test", "train_pbr", "val",
    ]  # fmt: skip
    assert json.loads((tmp_path / "2_data/qa/report.json").read_text())["passed"] is True
    sheet = Image.open(tmp_path / "2_data/qa/labels.png")  # 4 x 4 tiles of 4:3 frames, not squashed
    assert sheet.width == pytest.approx(sheet.height * 4 / 3, rel=0.05)
    metrics = json.loads((tmp_path / "3_training/metrics.json").read_text())
    assert metrics["n_test"] >= 3
