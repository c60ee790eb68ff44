"""Stage 2: the label checks data/qa.py adds for scene layouts (several instances per frame, scene_gt_info.json):

    info_mismatch   scene_gt_info.json disagrees with the masks: px_count_visib vs mask_visib/, px_count_all
                    vs mask/ (unless the object is cut by the border), visib_fract vs px_count_visib /
                    px_count_all, or mask_visib/ has pixels outside the instance's own mask/
    bbox_mismatch   bbox_visib is not the box of mask_visib/, or bbox_obj not the box of the model's
                    projected vertices (within data.qa.bbox_tol px)
    visib_overlap   two instances of one image are both visible at the same pixels (mask_visib/)

An instance is checked here only when qa.check_instance found its pose, masks and depth right, and only
against what exists (scene_gt_info.json and the masks are optional in BOP). Tolerances: data.qa.info_tol
(a fraction of the pixel counts, and of visib_fract) and data.qa.bbox_tol (pixels).
"""

import numpy as np
from PIL import Image

from .render import bbox

SCENE_CHECKS = ("info_mismatch", "bbox_mismatch", "visib_overlap")


def read_mask(path):
    return np.asarray(Image.open(path)) > 0 if path.exists() else None


def projected_bbox(verts_cam, K):
    """[x, y, w, h] of the pixel centres inside the model's projected vertices' extent (not clipped to the
    image: a truncated object's box reaches past the border, as BOP's bbox_obj does)."""
    uv = (verts_cam @ np.asarray(K, float).reshape(3, 3).T)[:, :2] / verts_cam[:, 2:]
    lo, hi = np.ceil(uv.min(0) - 1e-6), np.floor(uv.max(0) + 1e-6)
    return [int(lo[0]), int(lo[1]), int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1)]


def check_info(info, verts_cam, K, size, scene_dir, im_id, gt_id, cfg_qa):
    """Problems (check name, detail) of one instance's scene_gt_info.json record against its masks and
    its projected model."""
    height, width = size
    name = f"{im_id:06d}_{gt_id:06d}.png"
    mask, visib = read_mask(scene_dir / "mask" / name), read_mask(scene_dir / "mask_visib" / name)
    tol, bbox_tol = float(cfg_qa.info_tol), float(cfg_qa.bbox_tol)
    px_all, px_visib = int(info.get("px_count_all", -1)), int(info.get("px_count_visib", -1))
    box_obj = projected_bbox(verts_cam, K)
    truncated = (
        box_obj[0] < 0
        or box_obj[1] < 0
        or box_obj[0] + box_obj[2] > width
        or box_obj[1] + box_obj[3] > height
    )
    info_problems, bbox_problems = [], []

    def off(count, pixels):
        return abs(count - pixels) > tol * max(count, pixels) + 1

    if visib is not None and px_visib >= 0 and off(px_visib, int(visib.sum())):
        info_problems.append(f"px_count_visib {px_visib} but mask_visib/{name} has {int(visib.sum())} px")
    if mask is not None and px_all >= 0 and not truncated and off(px_all, int(mask.sum())):
        info_problems.append(f"px_count_all {px_all} but mask/{name} has {int(mask.sum())} px")
    if "visib_fract" in info and px_all > 0 and px_visib >= 0:
        fract = px_visib / px_all
        if abs(float(info["visib_fract"]) - fract) > tol:
            info_problems.append(
                f"visib_fract {float(info['visib_fract']):.3f} but px_count_visib / px_count_all = {fract:.3f}"
            )
    if mask is not None and visib is not None and (visib & ~mask).sum() > tol * max(int(visib.sum()), 1):
        info_problems.append(f"{int((visib & ~mask).sum())} px of mask_visib/{name} lie outside mask/{name}")
    if visib is not None and "bbox_visib" in info:
        expected = bbox(visib)
        if np.abs(np.subtract(info["bbox_visib"], expected)).max() > bbox_tol:
            bbox_problems.append(
                f"bbox_visib {list(info['bbox_visib'])} but mask_visib/{name} spans {expected}"
            )
    if "bbox_obj" in info and np.abs(np.subtract(info["bbox_obj"], box_obj)).max() > bbox_tol:
        bbox_problems.append(f"bbox_obj {list(info['bbox_obj'])} but the model at the pose spans {box_obj}")
    problems = [("info_mismatch", "; ".join(info_problems))] if info_problems else []
    return problems + ([("bbox_mismatch", "; ".join(bbox_problems))] if bbox_problems else [])


def check_overlap(scene_dir, im_id, gt_ids, cfg_qa):
    """[(gt_id, detail)]: instances visible where an earlier instance of the image is visible too (more
    than data.qa.info_tol of the smaller mask_visib)."""
    seen, problems = [], []
    for gt_id in gt_ids:
        name = f"{im_id:06d}_{gt_id:06d}.png"
        visib = read_mask(scene_dir / "mask_visib" / name)
        if visib is None:
            continue
        for other, other_visib in seen:
            shared = int((visib & other_visib).sum())
            if shared > float(cfg_qa.info_tol) * min(int(visib.sum()), int(other_visib.sum())):
                problems.append(
                    (gt_id, f"{shared} px of mask_visib/{name} are also visible for instance {other}")
                )
        seen.append((gt_id, visib))
    return problems
