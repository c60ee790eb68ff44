"""6D pose error metrics, with the definitions of bop_toolkit's pose_error.py (re, te, add, adi).

Per sample (poses map model points to the camera frame, mm; R 3x3, t (3,)):

    re_deg    rotation error: arccos((trace(R_pred R_gt^T) - 1) / 2) in degrees (bop_toolkit `re`;
              computed without arccos's loss of precision near 0, see rotation_error_deg)
    te_cm     translation error: |t_pred - t_gt| in cm (bop_toolkit `te`, which is in mm)
    add_mm    ADD: mean over model points x of |(R_pred x + t_pred) - (R_gt x + t_gt)| (bop_toolkit `add`)
    adds_mm   ADD-S: mean over model points of the distance from the ground-truth-posed point to the
              nearest predicted-posed point (bop_toolkit `adi`, scipy cKDTree as there)
    ADD(-S)   ADD for asymmetric objects, ADD-S for symmetric ones (PoseCNN / YCB-Video convention)

`pose_errors(R_pred, t_pred, R_gt, t_gt, points_mm)` returns these per sample; `summarize(per_sample,
n_missed)` reduces them to the flat keys of 3_training/metrics.json. `n_missed` annotated instances have
no estimate (no detection matched them): as in BOP's recall scores, each is a failure in the recall-style
keys (RECALL_KEYS: the fractions and AUCs are over all n_test instances, a miss contributes 0); the error
statistics exist only for estimates:

    re_deg_median, re_deg_mean   rotation error (deg), over the n_estimated instances with an estimate
    te_cm_median, te_cm_mean     translation error (cm), the same
    add_01d       fraction of all n_test instances with ADD < 0.1 * object diameter
    adds_01d      the same with ADD-S
    add_s_01d     the same with ADD(-S)
    adds_auc      area under the ADD-S accuracy-threshold curve up to 10 cm, normalised to [0, 1]
    add_s_auc     the same for ADD(-S)
    acc_5deg5cm   fraction of all n_test instances with re < 5 deg and te < 5 cm
    n_test        number of annotated test instances (estimated + missed)
    n_estimated   number of test instances with an estimate (= n_test without misses)

The AUC is computed exactly, not by sampling thresholds: with accuracy(tau) = mean(e < tau),

    (1 / T) * integral_0^T accuracy(tau) dtau = mean(max(0, 1 - e / T)),  T = 0.1 m,

because each sample contributes (T - min(e, T)) / T. PoseCNN's released code approximates the same area
VOC-style on a threshold grid, so its numbers can differ from these in the third digit.
"""

import numpy as np
from scipy.spatial import cKDTree

AUC_MAX_MM = 100.0
METRIC_KEYS = (
    "re_deg_median",
    "re_deg_mean",
    "te_cm_median",
    "te_cm_mean",
    "add_01d",
    "adds_01d",
    "add_s_01d",
    "adds_auc",
    "add_s_auc",
    "acc_5deg5cm",
    "n_test",
    "n_estimated",
)
# fractions of the annotated instances that are right: a missed instance counts as wrong
RECALL_KEYS = ("add_01d", "adds_01d", "add_s_01d", "adds_auc", "add_s_auc", "acc_5deg5cm")
PER_SAMPLE_KEYS = ("re_deg", "te_cm", "add_mm", "adds_mm", "diameter_mm", "symmetric")


def _as_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def rotation_error_deg(R_pred, R_gt):
    """[..., 3, 3] x2 -> [...] degrees in [0, 180]: bop_toolkit's `re`, arccos((trace(R_pred R_gt^T) - 1) / 2).

    Computed as 2 atan2(sin(a/2), cos(a/2)) with sin(a/2) = |R_pred - R_gt|_F / (2 sqrt 2) and
    cos(a/2) = sqrt((1 + trace) / 4): the same angle for rotation matrices, but arccos loses precision near
    0 deg (float32 rounding of identical poses reads as ~0.01 deg through arccos, ~1e-5 deg here).
    """
    R_pred, R_gt = _as_numpy(R_pred), _as_numpy(R_gt)
    trace = np.einsum("...ij,...ij->...", R_pred, R_gt)  # trace(R_pred @ R_gt^T)
    sin_half = np.linalg.norm(R_pred - R_gt, axis=(-2, -1)) / (2.0 * np.sqrt(2.0))
    cos_half = np.sqrt(np.maximum(0.0, 1.0 + trace) / 4.0)
    return np.degrees(2.0 * np.arctan2(sin_half, cos_half))


def translation_error_mm(t_pred, t_gt):
    return np.linalg.norm(_as_numpy(t_pred) - _as_numpy(t_gt), axis=-1)


def transform(points, R, t):
    """Model points [N, 3] under pose (R [3, 3], t [3]) -> [N, 3]."""
    return points @ R.T + t


def add_mm(R_pred, t_pred, R_gt, t_gt, points):
    """ADD of one pose: mean distance between corresponding model points (mm)."""
    return float(
        np.linalg.norm(transform(points, R_pred, t_pred) - transform(points, R_gt, t_gt), axis=1).mean()
    )


def adds_mm(R_pred, t_pred, R_gt, t_gt, points):
    """ADD-S of one pose: mean over ground-truth-posed points of the nearest predicted-posed point (mm)."""
    predicted = transform(points, R_pred, t_pred)
    if not np.isfinite(predicted).all():
        return float("nan")  # cKDTree rejects NaN; summarize() reports non-finite errors by name
    nearest, _ = cKDTree(predicted).query(transform(points, R_gt, t_gt), k=1)
    return float(nearest.mean())


def pose_errors(R_pred, t_pred, R_gt, t_gt, points_mm):
    """Errors of a batch of poses ([B, 3, 3], [B, 3] mm, torch or numpy) for one object's model points.

    Returns {"re_deg", "te_cm", "add_mm", "adds_mm"}, each a float64 array [B].
    """
    R_pred, t_pred, R_gt, t_gt = (_as_numpy(x) for x in (R_pred, t_pred, R_gt, t_gt))
    points = _as_numpy(points_mm)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"model points must be an (N, 3) array with N >= 1, got shape {points.shape}")
    if R_pred.shape != R_gt.shape or R_pred.shape[-2:] != (3, 3) or t_pred.shape != t_gt.shape:
        raise ValueError(
            f"pose shapes differ: R_pred {R_pred.shape}, R_gt {R_gt.shape}, t_pred {t_pred.shape}, t_gt {t_gt.shape}"
        )
    poses = list(zip(R_pred, t_pred, R_gt, t_gt, strict=True))
    return {
        "re_deg": rotation_error_deg(R_pred, R_gt),
        "te_cm": translation_error_mm(t_pred, t_gt) / 10.0,
        "add_mm": np.array([add_mm(*pose, points) for pose in poses]),
        "adds_mm": np.array([adds_mm(*pose, points) for pose in poses]),
    }


def add_s_mm(add, adds, symmetric):
    """ADD(-S): ADD-S where the object is symmetric, ADD where it is not."""
    return np.where(np.asarray(symmetric, dtype=bool), _as_numpy(adds), _as_numpy(add))


def auc(errors_mm, max_mm=AUC_MAX_MM, n_missed=0):
    """Area under accuracy(threshold) for thresholds in [0, max_mm], normalised: mean(max(0, 1 - e / max_mm)),
    the mean taken over the errors and `n_missed` instances without an estimate (each contributes 0)."""
    errors = _as_numpy(errors_mm)
    return float(np.maximum(0.0, 1.0 - errors / max_mm).sum() / (len(errors) + n_missed))


def accuracy_curve(errors_mm, thresholds_mm):
    """Fraction of samples with error < threshold, for each threshold."""
    errors = np.sort(_as_numpy(errors_mm))
    return np.searchsorted(errors, _as_numpy(thresholds_mm), side="left") / len(errors)


def _parse_bool(value):
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes"):
            return True
        if value.strip().lower() in ("0", "false", "no", ""):
            return False
        raise ValueError(f"symmetric: cannot read {value!r} as a boolean")
    return bool(value)


def columns(per_sample):
    """Per-sample errors as float64 columns; accepts columns (a dict of sequences) or rows (a list of dicts,
    e.g. csv.DictReader over errors.csv, whose values are strings)."""
    if not isinstance(per_sample, dict):
        rows = list(per_sample)
        per_sample = {k: [row[k] for row in rows] for k in PER_SAMPLE_KEYS if not rows or k in rows[0]}
    missing = [k for k in PER_SAMPLE_KEYS if k not in per_sample]
    if missing:
        raise ValueError(f"per-sample errors lack the columns {missing} (need {PER_SAMPLE_KEYS})")
    out = {k: np.array([float(v) for v in per_sample[k]]) for k in PER_SAMPLE_KEYS if k != "symmetric"}
    out["symmetric"] = np.array([_parse_bool(v) for v in per_sample["symmetric"]], dtype=bool)
    lengths = {len(v) for v in out.values()}
    if len(lengths) != 1:
        raise ValueError(f"per-sample error columns have different lengths {sorted(lengths)}")
    return out


def summarize(per_sample, n_missed=0):
    """Per-sample errors (see `columns`) of the estimated instances, plus `n_missed` annotated instances
    without an estimate -> the flat metrics.json dict (keys METRIC_KEYS; see the module docstring)."""
    c = columns(per_sample)
    n = len(c["re_deg"])
    if n == 0:
        raise ValueError("no test samples to summarize")
    if int(n_missed) != n_missed or n_missed < 0:
        raise ValueError(f"n_missed={n_missed!r}: expected a count >= 0 of instances without an estimate")
    n_all = n + int(n_missed)
    for key in ("re_deg", "te_cm", "add_mm", "adds_mm"):
        bad = int((~np.isfinite(c[key])).sum())
        if bad:
            raise ValueError(
                f"{bad} of {n} samples have a non-finite {key}: the predictions contain NaN or inf"
            )
    if np.any(c["diameter_mm"] <= 0):
        raise ValueError("diameter_mm must be > 0 for every sample")
    add_s = add_s_mm(c["add_mm"], c["adds_mm"], c["symmetric"])
    within = 0.1 * c["diameter_mm"]
    return {
        "re_deg_median": float(np.median(c["re_deg"])),
        "re_deg_mean": float(np.mean(c["re_deg"])),
        "te_cm_median": float(np.median(c["te_cm"])),
        "te_cm_mean": float(np.mean(c["te_cm"])),
        "add_01d": float(np.sum(c["add_mm"] < within) / n_all),
        "adds_01d": float(np.sum(c["adds_mm"] < within) / n_all),
        "add_s_01d": float(np.sum(add_s < within) / n_all),
        "adds_auc": auc(c["adds_mm"], n_missed=n_all - n),
        "add_s_auc": auc(add_s, n_missed=n_all - n),
        "acc_5deg5cm": float(np.sum((c["re_deg"] < 5.0) & (c["te_cm"] < 5.0)) / n_all),
        "n_test": n_all,
        "n_estimated": n,
    }
