"""Stage 3 evaluation on a tiny hand-made BOP dataset with fake estimators (no training needed)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy.spatial.transform import Rotation

from {{ cookiecutter.package_name }} import evaluation
from {{ cookiecutter.package_name }}.pose import evaluation as pose_evaluation
from {{ cookiecutter.package_name }}.pose import metrics

PROJECT = Path(__file__).resolve().parents[2]
HALF_EXTENTS = np.array([20.0, 30.0, 40.0])
N_IMAGES, SIZE, SHADE = 6, 32, 20
K = np.array([[40.0, 0.0, 15.5], [0.0, 40.0, 15.5], [0.0, 0.0, 1.0]])


def box_ply(path):
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * HALF_EXTENTS
    faces = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
             (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]  # fmt: skip
    lines = ["ply", "format ascii 1.0", f"element vertex {len(corners)}", "property float x", "property float y",
             "property float z", f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]  # fmt: skip
    lines += [" ".join(f"{v:g}" for v in c) for c in corners] + [f"3 {a} {b} {c}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def gt_poses():
    R = Rotation.random(N_IMAGES, random_state=0).as_matrix()
    t = np.stack(
        [np.linspace(-20, 20, N_IMAGES), np.linspace(10, -10, N_IMAGES), np.full(N_IMAGES, 400.0)], 1
    )
    return R, t


def make_bop(root, symmetric=False):
    """models/ with a 40x60x80 mm box, test/000000 with N_IMAGES images; image i is filled with i * SHADE."""
    (root / "models").mkdir(parents=True)
    box_ply(root / "models" / "obj_000001.ply")
    info = {"diameter": float(2 * np.linalg.norm(HALF_EXTENTS))}
    if symmetric:
        info["symmetries_discrete"] = [[-1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]
    (root / "models" / "models_info.json").write_text(json.dumps({"1": info}))
    scene = root / "test" / "000000"
    (scene / "rgb").mkdir(parents=True)
    R, t = gt_poses()
    scene_gt, scene_camera, scene_info = {}, {}, {}
    for i in range(N_IMAGES):
        Image.fromarray(np.full((SIZE, SIZE, 3), i * SHADE, np.uint8)).save(scene / "rgb" / f"{i:06d}.png")
        scene_gt[str(i)] = [{"cam_R_m2c": R[i].reshape(-1).tolist(), "cam_t_m2c": t[i].tolist(), "obj_id": 1}]
        scene_camera[str(i)] = {"cam_K": K.reshape(-1).tolist(), "depth_scale": 1.0}
        scene_info[str(i)] = [{"visib_fract": 1.0 - 0.1 * i}]
    for name, data in (("scene_gt", scene_gt), ("scene_camera", scene_camera), ("scene_gt_info", scene_info)):
        (scene / f"{name}.json").write_text(json.dumps(data))
    return root


class OracleEstimator(torch.nn.Module):
    """Reads the image id from the pixel values and returns its ground truth, turned by `turn_deg` about z
    for odd ids and shifted by `shift_mm` along x: the expected errors are known exactly."""

    def __init__(self, turn_deg=0.0, shift_mm=0.0):
        super().__init__()
        R, t = gt_poses()
        turn = Rotation.from_rotvec([0, 0, math.radians(turn_deg)]).as_matrix()
        R_pred = np.stack([R[i] @ turn if i % 2 else R[i] for i in range(N_IMAGES)])
        self.register_buffer("R", torch.tensor(R_pred, dtype=torch.float32))
        self.register_buffer("t", torch.tensor(t + [shift_mm, 0, 0], dtype=torch.float32))

    def forward(self, image, K):
        ids = (image[:, 0, 0, 0] * 255 / SHADE).round().long()
        return self.R[ids], self.t[ids]


def make_cfg(tmp_path, data_root, image_size=SIZE):
    return OmegaConf.create(
        {
            "device": "cpu",
            "task": {"_target_": "{{ cookiecutter.package_name }}.pose.task.PoseTask"},
            "paths": {"training": str(tmp_path / "3_training"), "logs": str(tmp_path / "logs")},
            "data": {
                "root": str(data_root),
                "obj_id": 1,
                "image_size": image_size,
                "preload": False,
                "min_visib_fract": 0.0,
                "splits": {"test": "test"},
            },  # fmt: skip
            "training": {"checkpoint_dir": str(tmp_path / "3_training" / "checkpoints"), "batch_size": 4},
            "logger": {"name": "none"},
        }
    )


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_evaluate_writes_every_output_with_the_contract_columns(tmp_path):
    data = make_bop(tmp_path / "bop")
    cfg = make_cfg(tmp_path, data)
    summary = evaluation.evaluate(cfg, OracleEstimator(turn_deg=10.0, shift_mm=3.0), torch.device("cpu"))
    out = tmp_path / "3_training"

    written = json.loads((out / "metrics.json").read_text())
    assert written == summary and set(written) == set(metrics.METRIC_KEYS)
    assert written["n_test"] == N_IMAGES
    assert written["te_cm_median"] == pytest.approx(0.3, abs=1e-5)
    assert written["re_deg_median"] == pytest.approx(5.0, abs=1e-3)  # half the instances at 0, half at 10
    assert written["acc_5deg5cm"] == 0.5

    columns, rows = read_csv(out / "errors.csv")
    assert columns == ["scene_id", "im_id", "obj_id", "gt_id", "rgb_path", "re_deg", "te_cm", "add_mm", "adds_mm",
                       "diameter_mm", "symmetric", "visib_fract", "R_gt", "t_gt", "R_pred", "t_pred", "K"]  # fmt: skip
    assert [int(r["im_id"]) for r in rows] == list(range(N_IMAGES))
    R_gt, t_gt = gt_poses()
    for row in rows:
        i = int(row["im_id"])
        assert float(row["re_deg"]) == pytest.approx(10.0 if i % 2 else 0.0, abs=1e-3)
        assert np.allclose(np.array(row["R_gt"].split(), float).reshape(3, 3), R_gt[i], atol=1e-6)
        assert np.allclose(np.array(row["t_gt"].split(), float), t_gt[i], atol=1e-4)
        assert np.allclose(np.array(row["K"].split(), float).reshape(3, 3), K)
        assert float(row["visib_fract"]) == pytest.approx(1.0 - 0.1 * i)
        assert row["symmetric"] == "0" and float(row["diameter_mm"]) == pytest.approx(
            2 * np.linalg.norm(HALF_EXTENTS)
        )
        assert Path(row["rgb_path"]).is_file()
    assert metrics.summarize(rows) == pytest.approx(
        summary, abs=1e-5
    )  # errors.csv alone reproduces metrics.json

    columns, predictions = read_csv(out / "predictions.csv")
    assert columns == ["scene_id", "im_id", "obj_id", "score", "R", "t", "time"]
    for row, error_row in zip(predictions, rows, strict=True):
        assert row["R"] == error_row["R_pred"] and row["t"] == error_row["t_pred"]
        assert len(row["R"].split()) == 9 and len(row["t"].split()) == 3 and float(row["time"]) >= 0

    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"accuracy_vs_threshold.csv", "accuracy_vs_threshold.png", "error_histograms.png", "predictions.png",
            "hist_re_deg.csv", "hist_te_cm.csv", "hist_add_s_rel.csv"} <= plots  # fmt: skip
    columns, curve = read_csv(out / "plots" / "accuracy_vs_threshold.csv")
    assert columns == ["threshold_cm", "add_s", "adds", "add"]
    assert float(curve[-1]["add_s"]) == 1.0 and float(curve[0]["add_s"]) == 0.0
    columns, histogram = read_csv(out / "plots" / "hist_re_deg.csv")
    assert sum(int(r["count"]) for r in histogram) == N_IMAGES
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_symmetric_object_uses_adds(tmp_path):
    data = make_bop(tmp_path / "bop", symmetric=True)
    # A 180 degree turn about z maps the box onto itself: ADD fails, ADD-S (and so ADD(-S)) is perfect.
    summary = evaluation.evaluate(
        make_cfg(tmp_path, data), OracleEstimator(turn_deg=180.0), torch.device("cpu")
    )
    assert summary["add_s_01d"] == 1.0 and summary["adds_01d"] == 1.0 and summary["add_01d"] == 0.5
    _, rows = read_csv(tmp_path / "3_training" / "errors.csv")
    assert {r["symmetric"] for r in rows} == {"1"}


def test_predict_returns_one_record_per_instance(tmp_path):
    from {{ cookiecutter.package_name }}.data.bop import BopDataset

    dataset = BopDataset(make_bop(tmp_path / "bop"), "test", 1)
    records = pose_evaluation.predict(
        OracleEstimator(), torch.utils.data.DataLoader(dataset, batch_size=4), torch.device("cpu")
    )
    assert len(records) == N_IMAGES
    R_gt, _ = gt_poses()
    for r in records:
        assert np.allclose(r["R_pred"], R_gt[r["im_id"]], atol=1e-6) and np.allclose(
            r["R_gt"], r["R_pred"], atol=1e-6
        )
        assert r["time_s"] >= 0 and r["scene_id"] == 0 and r["gt_id"] == 0


def test_nan_predictions_fail_clearly(tmp_path):
    class Broken(OracleEstimator):
        def forward(self, image, K):
            R, t = super().forward(image, K)
            return R * float("nan"), t

    cfg = make_cfg(tmp_path, make_bop(tmp_path / "bop"))
    with pytest.raises(ValueError, match="non-finite"):
        evaluation.evaluate(cfg, Broken(), torch.device("cpu"))
    assert not (tmp_path / "3_training" / "metrics.json").exists()


def test_missing_checkpoint_names_the_folder(tmp_path):
    cfg = make_cfg(tmp_path, make_bop(tmp_path / "bop"))
    with pytest.raises(FileNotFoundError, match="checkpoints.*make train"):
        evaluation.evaluate(cfg)


def save_untrained_checkpoint(tmp_path, *overrides, seed=0, name="last.pt"):
    """A checkpoint as training writes it (model weights + resolved config) for a network initialised
    from `seed`; returns (config, checkpoint path, the network)."""
    from hydra import compose, initialize_config_dir

    from {{ cookiecutter.package_name }}.paths import CONFIG_DIR
    from {{ cookiecutter.package_name }}.pose.model import build_model

    overrides = [f"paths.root={tmp_path}", f"data.root={tmp_path / 'bop'}", f"data.image_size={SIZE}",
                 "data.preload=false", "logger=none", "device=cpu", *overrides]  # fmt: skip
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    checkpoint = tmp_path / "3_training" / "checkpoints" / name
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_model(cfg)
    torch.save({"model": net.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}, checkpoint)
    return cfg, checkpoint, net


def predicted_poses(tmp_path):
    with open(tmp_path / "3_training" / "predictions.csv", newline="") as f:
        return [(row["R"], row["t"]) for row in csv.DictReader(f)]


def accuracy(summary):
    return {k: v for k, v in summary.items() if k in metrics.METRIC_KEYS and "time" not in k}


def test_evaluates_the_trained_checkpoint(tmp_path):
    from {{ cookiecutter.package_name }}.pose.model import PoseEstimator

    make_bop(tmp_path / "bop")
    cfg, _, net = save_untrained_checkpoint(tmp_path, "experiment=smoke", seed=0)
    summary = evaluation.evaluate(cfg)
    assert summary["n_test"] == N_IMAGES and all(math.isfinite(v) for v in summary.values())
    assert json.loads((tmp_path / "3_training" / "metrics.json").read_text()) == summary
    from_checkpoint = predicted_poses(tmp_path)
    # the numbers are the checkpoint's: the same network passed in directly gives the same poses ...
    direct = evaluation.evaluate(cfg, PoseEstimator(net, cfg.model.test_views).eval(), torch.device("cpu"))
    assert accuracy(direct) == accuracy(summary) and predicted_poses(tmp_path) == from_checkpoint
    # ... and best.pt, once training kept one, is evaluated instead of last.pt: other weights, other poses
    _, _, other = save_untrained_checkpoint(tmp_path, "experiment=smoke", seed=1, name="best.pt")
    from_best = evaluation.evaluate(cfg)
    assert predicted_poses(tmp_path) != from_checkpoint
    assert accuracy(from_best)["re_deg_median"] != summary["re_deg_median"]
    assert accuracy(from_best) == accuracy(
        evaluation.evaluate(cfg, PoseEstimator(other, cfg.model.test_views).eval())
    )


@pytest.mark.slow
def test_cli_writes_metrics_and_fails_with_one_message(tmp_path):
    make_bop(tmp_path / "bop")
    _, checkpoint, _ = save_untrained_checkpoint(tmp_path, "experiment=smoke")
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "src"){% if cookiecutter.use_wandb == "yes" %}, WANDB_MODE="offline"{% endif %})
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}.evaluation", "experiment=smoke",
               f"paths.root={tmp_path}", f"data.root={tmp_path / 'bop'}", f"data.image_size={SIZE}",
               "data.preload=false", "logger=none", "device=cpu"]  # fmt: skip

    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "metrics.json" in result.stdout
    summary = json.loads((tmp_path / "3_training" / "metrics.json").read_text())
    assert summary["n_test"] == N_IMAGES

    checkpoint.unlink()
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr
