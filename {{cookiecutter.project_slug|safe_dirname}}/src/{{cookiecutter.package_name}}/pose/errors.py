"""The pose example's side of error analysis and metric review (PoseTask's error hooks): derived columns of
errors.csv, the automatic pose tags, the slices of the headline, the axes on the contact sheet."""

import numpy as np
import roma
import torch

from ..metric_review import bin_labels
from .draw import draw_axes
from .geometry import EULER_CONVENTION

POSE_COLUMNS = ("add_mm", "adds_mm", "diameter_mm", "symmetric", "visib_fract", "R_gt", "t_gt", "K")
POSE_ID_COLUMNS = ("scene_id", "im_id", "obj_id", "gt_id")
POSE_SHEET_COLUMNS = (
    *POSE_ID_COLUMNS,
    "rgb_path",
    "re_deg",
    "te_cm",
    "add_s_mm",
    "diameter_mm",
    "visib_fract",
)


def has_pose_columns(table):
    return all(c in table.columns for c in POSE_COLUMNS)


def add_pose_columns(table):
    """Derived per-sample pose columns: add_s_mm (ADD, or ADD-S for symmetric objects), depth_mm,
    apparent_px (object diameter in pixels), rot_deg (geodesic angle of R_gt from identity) and
    view_deg (angle between the camera direction in model coordinates and the canonical view, -z)."""
    symmetric = np.nan_to_num(table.column("symmetric")) > 0.5
    table.set_column("add_s_mm", np.where(symmetric, table.column("adds_mm"), table.column("add_mm")))
    R, t, K = table.matrices("R_gt", (3, 3)), table.matrices("t_gt", (3,)), table.matrices("K", (3, 3))
    table.set_column("depth_mm", t[:, 2])
    table.set_column("apparent_px", K[:, 0, 0] * table.column("diameter_mm") / np.maximum(t[:, 2], 1e-6))
    cos = np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1, 1)
    table.set_column("rot_deg", np.degrees(np.arccos(cos)))
    camera_in_model = -np.einsum("nji,nj->ni", R, t)  # -R^T t
    cos_view = -camera_in_model[:, 2] / np.maximum(np.linalg.norm(camera_in_model, axis=1), 1e-9)
    table.set_column("view_deg", np.degrees(np.arccos(np.clip(cos_view, -1, 1))))


def euler_angles_deg(R):
    """Euler angles of R (N,3,3) in degrees with the pose package's convention (roma), as the Euler
    baseline sees its targets; returns (angles, convention)."""
    angles = roma.rotmat_to_euler(EULER_CONVENTION, torch.as_tensor(R, dtype=torch.float64), degrees=True)
    return angles.numpy(), EULER_CONVENTION


def pose_tags(table, thresholds):
    """{category: bool array over all rows} for the pose example. Thresholds: configs/debugging/error_analysis."""
    t = thresholds
    R, tvec, K = table.matrices("R_gt", (3, 3)), table.matrices("t_gt", (3,)), table.matrices("K", (3, 3))
    tags = {}
    symmetric = np.nan_to_num(table.column("symmetric")) > 0.5
    # The prediction is close to a symmetric copy of the GT: large ADD but small ADD-S.
    tags["near_symmetry"] = symmetric & (
        table.column("adds_mm") < t["near_symmetry_ratio"] * np.maximum(table.column("add_mm"), 1e-9)
    )
    euler, convention = euler_angles_deg(R)
    margin = t["euler_margin_deg"]
    tait_bryan = len(set(convention.lower())) == 3
    # Wrap-around: an outer angle near +-180 deg, where a tiny rotation flips the target by 360 deg.
    tags["euler_wrap"] = (np.abs(euler[:, [0, 2]]) > 180 - margin).any(axis=1)
    # Gimbal lock: middle angle near +-90 (Tait-Bryan) or near 0/180 (proper Euler): outer angles ambiguous.
    middle = np.abs(euler[:, 1])
    tags["gimbal_lock"] = middle > 90 - margin if tait_bryan else (middle < margin) | (middle > 180 - margin)
    width, height = 2 * K[:, 0, 2], 2 * K[:, 1, 2]  # principal point at the image centre
    tags["far_small"] = table.column("apparent_px") < t["small_fraction"] * width
    # Projected bounding sphere (radius diameter/2 about the model origin) crossing the image border:
    # an over-approximation, so a truncated object always gets the tag and a near-border one may too.
    z = np.maximum(tvec[:, 2], 1e-6)
    u = K[:, 0, 0] * tvec[:, 0] / z + K[:, 0, 2]
    v = K[:, 1, 1] * tvec[:, 1] / z + K[:, 1, 2]
    r = table.column("apparent_px") / 2
    tags["truncated"] = (u - r < 0) | (v - r < 0) | (u + r > width) | (v + r > height)
    tags["occluded"] = np.nan_to_num(table.column("visib_fract"), nan=1.0) < t["occluded_below"]
    tags["extreme_view"] = table.column("view_deg") > t["extreme_view_deg"]
    if "brightness" in table.columns:
        brightness = table.column("brightness")
        brightness = brightness / 255 if np.nanmax(brightness) > 1 else brightness
        tags["low_light"] = brightness < t["low_light_below"]
    if "blur_px" in table.columns:
        tags["blurry"] = np.nan_to_num(table.column("blur_px")) > t["blurry_above_px"]
    return tags


def draw_error(image, table, i, scale):
    """GT (green) and predicted (red) object axes (x, y, z; half the diameter long) on sample i's image,
    a uint8 3xHxW thumbnail of the image at its `rgb_path` resized by scale = (sx, sy)."""
    if not has_pose_columns(table) or not {"R_pred", "t_pred"} <= set(table.columns):
        return image
    k = np.diag([scale[0], scale[1], 1.0]) @ table.matrices("K", (3, 3))[i]  # the thumbnail's pixels
    length = table.column("diameter_mm")[i] / 2
    for R, t, color in (("R_gt", "t_gt", (0, 255, 0)), ("R_pred", "t_pred", (255, 0, 0))):
        rot, trans = table.matrices(R, (3, 3))[i], table.matrices(t, (3,))[i]
        image = draw_axes(image, rot, trans, k, length, width=2, color=color)
    return image


def pose_slices(table):
    depth_cm = table.column("depth_mm") / 10
    edges = np.unique(np.nanquantile(depth_cm, [0, 1 / 3, 2 / 3, 1]))  # terciles; fewer when depths repeat
    if len(edges) < 2:
        distance = ([f"{edges[0]:.0f} cm"] * len(depth_cm), [f"{edges[0]:.0f} cm"])
    else:
        distance = bin_labels(
            depth_cm, edges, [f"{lo:.0f}–{hi:.0f} cm" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        )
    symmetric = ["symmetric" if s > 0.5 else "asymmetric" for s in np.nan_to_num(table.column("symmetric"))]
    return {
        "distance (camera depth)": distance,
        "rotation magnitude": bin_labels(
            table.column("rot_deg"), [0, 45, 90, 135, 180], ["0–45°", "45–90°", "90–135°", "135–180°"]
        ),
        "visibility": bin_labels(
            np.nan_to_num(table.column("visib_fract"), nan=1.0),
            [0, 0.5, 0.8, 1.0],
            ["<50% visible", "50–80% visible", "≥80% visible"],
        ),
        "symmetry": (symmetric, ["asymmetric", "symmetric"]),
    }
