"""Label QA: a clean capture passes; each kind of bad label is flagged with its ids; the command's report."""

import json
import shutil
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose
from {{ cookiecutter.package_name }}.data import qa

SPLITS = ["train", "val", "test"]


def settings(**changes):
    return OmegaConf.merge(compose("logger=none").data.qa, changes)


@pytest.fixture
def damaged(tiny_dataset, tmp_path):
    """A copy of the tiny dataset with one bad label of each kind in train; returns (root, expected ids)."""
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset.root, root)
    scene = root / "train" / "000000"
    gt_path = scene / "scene_gt.json"
    gt = json.loads(gt_path.read_text())

    def pose(im):
        return np.array(gt[str(im)][0]["cam_R_m2c"]).reshape(3, 3), np.array(gt[str(im)][0]["cam_t_m2c"])

    def set_pose(im, R, t):
        gt[str(im)][0].update(cam_R_m2c=[float(x) for x in np.ravel(R)], cam_t_m2c=[float(x) for x in t])

    R, t = pose(0)
    set_pose(0, R, [t[0], float("nan"), t[2]])
    R, t = pose(1)
    set_pose(1, 1.05 * R, t)  # not orthonormal
    R, t = pose(2)
    set_pose(2, np.diag([-1.0, 1, 1]) @ R, t)  # a reflection, det -1
    R, t = pose(3)
    set_pose(3, R, [t[0], t[1], -t[2]])
    R, t = pose(4)
    set_pose(4, R, [t[0] + 2 * t[2], t[1], t[2]])  # centre far right of the image
    R, t = pose(5)
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    set_pose(5, np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ R, t)  # a valid pose, not the imaged one
    depth = np.array(Image.open(scene / "depth/000006.png")).astype(np.int64)
    Image.fromarray(np.where(depth > 0, depth + 1000, 0).astype(np.uint16)).save(scene / "depth/000006.png")
    shutil.copy(scene / "rgb/000007.png", scene / "rgb/000008.png")
    gt["10"] = gt["9"]  # a copied label, with its masks, depth and gt_info
    for sub, name in (("mask", "{}_000000"), ("mask_visib", "{}_000000"), ("depth", "{}")):
        shutil.copy(
            scene / sub / f"{name.format('000009')}.png", scene / sub / f"{name.format('000010')}.png"
        )
    gt_path.write_text(json.dumps(gt))
    info = json.loads((scene / "scene_gt_info.json").read_text())
    info["10"] = info["9"]
    (scene / "scene_gt_info.json").write_text(json.dumps(info))
    expected = {
        "nonfinite": {0},
        "not_rotation": {1, 2},
        "behind_camera": {3},
        "outside_image": {4},
        "mask_mismatch": {5},
        "depth_mismatch": {6},
        "duplicate_image": {8},
        "duplicate_pose": {10},
    }
    return root, expected


def test_clean_capture_passes(tiny_dataset):
    issues, n_images, n_instances = qa.run_qa(tiny_dataset.root, SPLITS, settings())
    assert (n_images, n_instances) == (32, 32)
    assert {check: found for check, found in issues.items() if found} == {}


def test_each_bad_label_is_flagged(damaged):
    root, expected = damaged
    issues, _, _ = qa.run_qa(root, SPLITS, settings())
    assert set(issues) == set(qa.CHECKS)
    for check, ims in expected.items():
        assert {(i["split"], i["scene_id"], i["im_id"]) for i in issues[check]} == {
            ("train", 0, im) for im in ims
        }, check
    assert issues["duplicate_pose"][0]["detail"] == "same pose as train/000000/000009/0"
    assert issues["duplicate_image"][0]["detail"] == "same pixels as train/000000/000007"


def test_thresholds_come_from_the_config(damaged):
    root, _ = damaged
    issues, _, _ = qa.run_qa(root, SPLITS, settings(mask_iou=0.0, depth_tol=1.0))
    assert issues["mask_mismatch"] == [] and issues["depth_mismatch"] == []


def test_rasterize_matches_a_hand_computed_square():
    # a 20 x 20 mm square at z = 100 mm, f = 10 px: 2 x 2 px, centred on the principal point (4.5, 4.5)
    verts = np.array([[-10, -10, 100], [10, -10, 100], [10, 10, 100], [-10, 10, 100]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    K = np.array([[10, 0, 4.5], [0, 10, 4.5], [0, 0, 1.0]])
    depth = qa.rasterize(verts, faces, K, 10, 10)
    assert np.argwhere(depth > 0).tolist() == [[4, 4], [4, 5], [5, 4], [5, 5]]
    assert depth[4, 4] == pytest.approx(100.0)


def test_command_writes_report_and_exit_code(tiny_dataset, damaged, tmp_path, monkeypatch, capsys):
    root, expected = damaged
    out = tmp_path / "project"
    monkeypatch.setattr(sys, "argv", ["qa", f"paths.root={out}", f"data.root={root}", "logger=none"])
    with pytest.raises(SystemExit) as exit_info:
        qa.main()
    assert exit_info.value.code == 1
    report = json.loads((out / "2_data/qa/report.json").read_text())
    assert report["passed"] is False
    assert report["counts"] == {check: len(expected.get(check, ())) for check in qa.CHECKS}
    assert "CHECKLIST.md" in report["checklist_item"]
    markdown = (out / "2_data/qa/report.md").read_text()
    assert "**FAILED**" in markdown and "| behind_camera | 1 |" in markdown and "Label QA passes" in markdown
    assert "behind_camera 1" in capsys.readouterr().out
    sheet = Image.open(out / "2_data/qa/labels.png")
    assert sheet.width >= 4 * 128 and sheet.height >= 4 * 128  # 16 tiles of at least 128 px

    monkeypatch.setattr(
        sys, "argv", ["qa", f"paths.root={out}", f"data.root={tiny_dataset.root}", "logger=none"]
    )
    qa.main()  # no SystemExit: passed
    assert json.loads((out / "2_data/qa/report.json").read_text())["passed"] is True
    assert "no issues" in capsys.readouterr().out


def test_command_names_a_broken_file(tiny_dataset, tmp_path, monkeypatch, capsys):
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset.root, root)
    (root / "val/000000/scene_camera.json").write_text("{")
    monkeypatch.setattr(sys, "argv", ["qa", f"paths.root={tmp_path}", f"data.root={root}", "logger=none"])
    with pytest.raises(SystemExit) as exit_info:
        qa.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val/000000/scene_camera.json: malformed JSON" in err[0]


def test_unknown_object_and_missing_key_are_named(tiny_dataset, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset.root, root)
    path = root / "test/000000/scene_gt.json"
    gt = json.loads(path.read_text())
    gt["3"][0]["obj_id"] = 9
    path.write_text(json.dumps(gt))
    with pytest.raises(
        qa.BopFormatError, match=r"scene_gt\.json: image 3 instance 0: obj_id 9 is not in .*models_info"
    ):
        qa.run_qa(root, SPLITS, settings())
    del gt["3"][0]["cam_t_m2c"]
    path.write_text(json.dumps(gt))
    with pytest.raises(qa.BopFormatError, match=r"scene_gt\.json: image 3 instance 0 has no \['cam_t_m2c'\]"):
        qa.run_qa(root, SPLITS, settings())
