"""Pose metrics: property checks (seeded random loops) and agreement with a brute-force reference."""

import csv
import io
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from {{ cookiecutter.package_name }}.pose import metrics


def random_poses(n, seed):
    rng = np.random.default_rng(seed)
    R = Rotation.random(n, random_state=seed).as_matrix()
    t = rng.uniform(-100, 100, (n, 3)) + np.array([0.0, 0.0, 500.0])
    return R, t


def box_points(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 3)) * np.array([20.0, 35.0, 50.0])


def reference_errors(R_pred, t_pred, R_gt, t_gt, points):
    """The textbook definitions, brute force: full distance matrices, arccos of the relative rotation."""
    out = {"re_deg": [], "te_cm": [], "add_mm": [], "adds_mm": []}
    for Rp, tp, Rg, tg in zip(R_pred, t_pred, R_gt, t_gt, strict=True):
        relative = Rp @ Rg.T
        out["re_deg"].append(math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(relative) - 1) / 2)))))
        out["te_cm"].append(np.sqrt(((tp - tg) ** 2).sum()) / 10)
        pred = np.array([Rp @ x + tp for x in points])
        gt = np.array([Rg @ x + tg for x in points])
        out["add_mm"].append(np.sqrt(((pred - gt) ** 2).sum(1)).mean())
        distances = np.sqrt(((gt[:, None, :] - pred[None, :, :]) ** 2).sum(-1))
        out["adds_mm"].append(distances.min(1).mean())
    return {k: np.array(v) for k, v in out.items()}


def test_agrees_with_reference_implementation():
    R_gt, t_gt = random_poses(40, seed=1)
    R_pred, t_pred = random_poses(40, seed=2)
    # Half of the predictions near the ground truth, so small errors are covered too.
    R_pred[:20] = (
        Rotation.from_rotvec(np.random.default_rng(3).normal(0, 0.05, (20, 3))).as_matrix() @ R_gt[:20]
    )
    t_pred[:20] = t_gt[:20] + np.random.default_rng(3).normal(0, 5, (20, 3))
    points = box_points(200)
    ours = metrics.pose_errors(R_pred, t_pred, R_gt, t_gt, points)
    reference = reference_errors(R_pred, t_pred, R_gt, t_gt, points)
    for key in reference:
        np.testing.assert_allclose(ours[key], reference[key], rtol=1e-9, atol=1e-6, err_msg=key)


def test_pure_offset_gives_add_equal_to_offset_norm():
    R, t = random_poses(20, seed=4)
    offsets = np.random.default_rng(4).normal(0, 30, (20, 3))
    errors = metrics.pose_errors(R, t + offsets, R, t, box_points())
    np.testing.assert_allclose(errors["add_mm"], np.linalg.norm(offsets, axis=1), rtol=1e-12)
    np.testing.assert_allclose(errors["te_cm"], np.linalg.norm(offsets, axis=1) / 10, rtol=1e-12)
    np.testing.assert_allclose(errors["re_deg"], 0.0, atol=1e-5)
    assert np.all(errors["adds_mm"] <= errors["add_mm"] + 1e-9)


def test_adds_never_exceeds_add():
    for seed in range(5):
        R_gt, t_gt = random_poses(20, seed=10 + seed)
        R_pred, t_pred = random_poses(20, seed=20 + seed)
        errors = metrics.pose_errors(R_pred, t_pred, R_gt, t_gt, box_points(seed=seed))
        assert np.all(errors["adds_mm"] <= errors["add_mm"] + 1e-9)
        assert np.all(errors["adds_mm"] >= 0)


def test_rotation_by_theta_gives_re_theta():
    rng = np.random.default_rng(5)
    R_gt, t = random_poses(50, seed=5)
    theta = rng.uniform(0, 179.9, 50)
    axes = rng.normal(size=(50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    R_pred = Rotation.from_rotvec(axes * np.radians(theta)[:, None]).as_matrix() @ R_gt
    np.testing.assert_allclose(metrics.rotation_error_deg(R_pred, R_gt), theta, atol=1e-5)


def test_identity_prediction_is_perfect():
    R, t = random_poses(10, seed=6)
    errors = metrics.pose_errors(R, t, R, t, box_points())
    per_sample = dict(errors, diameter_mm=np.full(10, 100.0), symmetric=np.zeros(10, bool))
    summary = metrics.summarize(per_sample)
    assert summary["adds_auc"] == pytest.approx(1.0) and summary["add_s_auc"] == pytest.approx(1.0)
    assert summary["add_01d"] == summary["adds_01d"] == summary["add_s_01d"] == summary["acc_5deg5cm"] == 1.0
    assert summary["n_test"] == 10


def test_symmetric_object_rotated_by_its_symmetry_has_zero_adds():
    # A point set closed under a 90 degree turn about z (like a square prism): ADD-S ~ 0, ADD is not.
    rng = np.random.default_rng(7)
    quarter = rng.uniform(-1, 1, (100, 3)) * np.array([30.0, 30.0, 40.0])
    turn = Rotation.from_rotvec([0, 0, math.pi / 2]).as_matrix()
    points = np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])
    R_gt, t = random_poses(10, seed=7)
    errors = metrics.pose_errors(R_gt @ turn, t, R_gt, t, points)
    np.testing.assert_allclose(errors["adds_mm"], 0.0, atol=1e-9)
    assert np.all(errors["add_mm"] > 10)
    np.testing.assert_allclose(errors["re_deg"], 90.0, atol=1e-6)
    per_sample = dict(errors, diameter_mm=np.full(10, 100.0), symmetric=np.ones(10, bool))
    summary = metrics.summarize(per_sample)
    assert summary["add_s_01d"] == 1.0 and summary["add_01d"] == 0.0


def test_auc_is_the_normalised_area_under_the_accuracy_curve():
    errors = np.random.default_rng(8).exponential(40.0, 300)
    thresholds = np.linspace(0, metrics.AUC_MAX_MM, 200_001)
    numeric = np.trapezoid(metrics.accuracy_curve(errors, thresholds), thresholds) / metrics.AUC_MAX_MM
    assert metrics.auc(errors) == pytest.approx(numeric, abs=1e-4)
    assert metrics.auc(np.array([0.0, 50.0, 100.0, 250.0])) == pytest.approx((1 + 0.5 + 0 + 0) / 4)


def four_samples():
    return {
        "re_deg": [1.0, 4.0, 6.0, 2.0],
        "te_cm": [1.0, 6.0, 1.0, 4.9],
        "add_mm": [5.0, 20.0, 9.0, 50.0],
        "adds_mm": [4.0, 5.0, 8.0, 3.0],
        "diameter_mm": [100.0, 100.0, 100.0, 100.0],
        "symmetric": [False, False, True, True],
    }


def test_summarize_thresholds_and_add_s_choice():
    per_sample = four_samples()
    s = metrics.summarize(per_sample)
    assert s["add_01d"] == 0.5  # 5 and 9 are below 10
    assert s["adds_01d"] == 1.0
    assert s["add_s_01d"] == 0.75  # ADD 5, ADD 20 (fails), ADD-S 8, ADD-S 3
    assert s["acc_5deg5cm"] == 0.5  # samples 0 and 3
    assert s["re_deg_median"] == 3.0 and s["te_cm_mean"] == pytest.approx(12.9 / 4)
    assert set(s) == set(metrics.METRIC_KEYS)


def test_missed_instances_are_failures_in_the_recall_keys_only():
    per_sample = four_samples()
    found, with_misses = metrics.summarize(per_sample), metrics.summarize(per_sample, n_missed=2)
    assert (with_misses["n_test"], with_misses["n_estimated"]) == (6, 4) and found["n_test"] == 4
    for key in metrics.RECALL_KEYS:  # the same successes over 6 annotated instances instead of 4
        assert with_misses[key] == pytest.approx(found[key] * 4 / 6), key
    assert with_misses["add_s_01d"] == 0.5 and with_misses["adds_auc"] < found["adds_auc"]
    # the error statistics exist for estimates only
    for key in ("re_deg_median", "re_deg_mean", "te_cm_median", "te_cm_mean"):
        assert with_misses[key] == found[key]
    with pytest.raises(ValueError, match="n_missed"):
        metrics.summarize(per_sample, n_missed=-1)


def test_summarize_reads_errors_csv_rows():
    text = "re_deg,te_cm,add_mm,adds_mm,diameter_mm,symmetric\n1,1,5,4,100,0\n3,2,50,3,100,1\n"
    rows = list(csv.DictReader(io.StringIO(text)))
    s = metrics.summarize(rows)
    assert s["add_s_01d"] == 1.0 and s["add_01d"] == 0.5 and s["n_test"] == 2


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="lack the columns"):
        metrics.summarize({"re_deg": [1.0]})
    with pytest.raises(ValueError, match="no test samples"):
        metrics.summarize({k: [] for k in metrics.PER_SAMPLE_KEYS})
    R, t = random_poses(2, seed=9)
    with pytest.raises(ValueError, match="model points"):
        metrics.pose_errors(R, t, R, t, np.zeros((5, 2)))
    errors = metrics.pose_errors(np.full_like(R, np.nan), t, R, t, box_points())
    with pytest.raises(ValueError, match="non-finite re_deg"):
        metrics.summarize(dict(errors, diameter_mm=[100.0, 100.0], symmetric=[0, 0]))


def test_accepts_torch_tensors():  # torch is a required dependency: a missing one fails, not skips
    R, t = random_poses(3, seed=11)
    errors = metrics.pose_errors(
        torch.tensor(R), torch.tensor(t), torch.tensor(R), torch.tensor(t), box_points()
    )
    np.testing.assert_allclose(errors["add_mm"], 0.0, atol=1e-9)
