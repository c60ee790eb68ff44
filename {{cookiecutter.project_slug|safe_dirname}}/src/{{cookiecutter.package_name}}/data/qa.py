"""Stage 2: ground-truth annotation QA. Checks every label of a BOP dataset and writes a report.

    python -m <package>.data.qa                                   # the synthetic dataset (cfg.data.root)
    python -m <package>.data.qa data=bop data.root=/data/bop/lm data.qa.splits=[test]

Serves the 2_data/CHECKLIST.md item "Label QA passes" (ground-truth annotation and its QA). Checks,
per annotated instance (split, scene, im, gt):

    nonfinite         NaN or inf in cam_R_m2c / cam_t_m2c / cam_K
    not_rotation      cam_R_m2c not orthonormal (|R^T R - I| > tol) or det(R) != +1 (a reflection)
    behind_camera     t_z <= 0: the object centre is not in front of the camera
    outside_image     the projected object centre, or the whole projected model, lies outside the image
    mask_mismatch     the model rendered at the pose disagrees with mask/ (IoU) or mask_visib/ (fraction
                      of the visible mask outside the rendered silhouette), where masks exist
    depth_mismatch    depth/ inside mask_visib/ disagrees with the rendered depth (median |error|)
    duplicate_image   two images with identical pixels (within or across splits)
    duplicate_pose    two instances of the same object with the same pose (within or across splits)
    info_mismatch, bbox_mismatch, visib_overlap: scene_gt_info.json against the masks and the model, and
                      the instances of one image against each other (data/qa_scene.py)

Writes 2_data/qa/report.md and report.json (counts per check, offending ids); exits 1 when any check
fails, so `make qa` stops a pipeline that would train on bad labels.
"""

import hashlib
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .. import tracking
from ..files import atomic_path, write_json, write_text
from ..paths import CONFIG_DIR
from .bop import BopFormatError, load_models_info, model_path, read_json, read_ply, split_scenes
from .qa_scene import SCENE_CHECKS, check_info, check_overlap

CHECKLIST_ITEM = "2_data/CHECKLIST.md: Ground-truth annotation and its QA - Label QA passes (`make qa`)"
CHECKS = (
    "nonfinite",
    "not_rotation",
    "behind_camera",
    "outside_image",
    "mask_mismatch",
    "depth_mismatch",
    "duplicate_image",
    "duplicate_pose",
    *SCENE_CHECKS,
)


def rasterize(verts_cam, faces, K, height, width, chunk=1 << 21):
    """Z-buffer of a triangle mesh given in camera coordinates (mm), sampled at pixel centres (integer
    coordinates, as in K): depth (H,W) float64, 0 where no triangle covers the pixel centre.

    Written by hand (numpy) because no project dependency rasterizes, and QA should check the labels
    independently of the renderer that made them. Triangles touching z <= 1 mm (or NaN) are skipped."""
    verts_cam = np.asarray(verts_cam, float)
    z = verts_cam[:, 2]
    depth = np.full(height * width, np.inf)
    tri_ok = ((z > 1.0) & np.isfinite(verts_cam).all(1))[faces].all(1)
    faces = faces[tri_ok]
    if len(faces) == 0:
        return np.zeros((height, width))
    uv = (verts_cam @ np.asarray(K, float).T)[:, :2] / z[:, None]
    tri, tz = uv[faces], z[faces]  # F,3,2 and F,3
    x0 = np.clip(np.ceil(tri[..., 0].min(1)), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(tri[..., 0].max(1)), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(tri[..., 1].min(1)), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(tri[..., 1].max(1)), -1, height - 1).astype(np.int64)
    nx, ny = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
    counts = nx * ny
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    keep = (counts > 0) & (np.abs(area) > 1e-12)
    idx_all = np.nonzero(keep)[0]
    # triangles in chunks of about `chunk` candidate pixels (their bounding boxes), to bound memory
    cum = np.cumsum(counts[idx_all])
    for idx in np.split(idx_all, np.searchsorted(cum, np.arange(chunk, cum[-1] if len(cum) else 0, chunk))):
        if len(idx) == 0:
            continue
        cnt = counts[idx]
        t_i = np.repeat(np.arange(len(idx)), cnt)
        off = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        f = idx[t_i]
        px = x0[f] + off % nx[f]
        py = y0[f] + off // nx[f]

        def edge(p, q, px=px, py=py):
            return (q[:, 0] - p[:, 0]) * (py - p[:, 1]) - (q[:, 1] - p[:, 1]) * (px - p[:, 0])

        w0 = edge(b[f], c[f]) / area[f]
        w1 = edge(c[f], a[f]) / area[f]
        w2 = edge(a[f], b[f]) / area[f]
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        # perspective-correct depth: 1/z is affine in screen space
        inv_z = w0 / tz[f, 0] + w1 / tz[f, 1] + w2 / tz[f, 2]
        np.minimum.at(depth, (py * width + px)[inside], 1.0 / inv_z[inside])
    depth[~np.isfinite(depth)] = 0.0
    return depth.reshape(height, width)


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _read_mask(path):
    return np.asarray(Image.open(path)) > 0


class Model:
    """One object's mesh and diameter, loaded once."""

    def __init__(self, root, obj_id, info):
        self.verts, self.faces, _ = read_ply(model_path(root, obj_id))
        self.diameter = float(info["diameter"])


def check_instance(rec, K, size, model, scene_dir, im_id, gt_id, depth_scale, cfg_qa):
    """Problems (check name, detail) of one annotated instance."""
    R, t = np.asarray(rec["cam_R_m2c"], float), np.asarray(rec["cam_t_m2c"], float)
    if R.size != 9 or t.size != 3:
        return [("nonfinite", f"cam_R_m2c has {R.size} / cam_t_m2c has {t.size} numbers")]
    R, K = R.reshape(3, 3), np.asarray(K, float).reshape(3, 3)
    if not (np.isfinite(R).all() and np.isfinite(t).all() and np.isfinite(K).all()):
        return [("nonfinite", "NaN or inf in cam_R_m2c, cam_t_m2c or cam_K")]
    problems = []
    ortho = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if ortho > cfg_qa.rotation_tol or abs(det - 1) > cfg_qa.rotation_tol:
        problems.append(("not_rotation", f"|R^T R - I| = {ortho:.2e}, det(R) = {det:.4f}"))
    if t[2] <= 0:
        return problems + [("behind_camera", f"t_z = {t[2]:.1f} mm")]
    height, width = size
    centre = K @ t
    u, v = centre[:2] / centre[2]
    if not (-0.5 <= u <= width - 0.5 and -0.5 <= v <= height - 0.5):
        problems.append(
            ("outside_image", f"object centre projects to ({u:.1f}, {v:.1f}), image {width}x{height}")
        )
    if problems:
        return problems
    cam = model.verts @ R.T + t
    depth_render = rasterize(cam, model.faces, K, height, width)
    silhouette = depth_render > 0
    if not silhouette.any():
        return [("outside_image", "no part of the model projects inside the image")]
    name = f"{im_id:06d}_{gt_id:06d}.png"
    mask_path, visib_path = scene_dir / "mask" / name, scene_dir / "mask_visib" / name
    disagree = []
    if mask_path.exists():
        score = iou(silhouette, _read_mask(mask_path))
        if score < cfg_qa.mask_iou:
            disagree.append(f"IoU(model at pose, mask/{name}) = {score:.3f} < {cfg_qa.mask_iou}")
    visib = _read_mask(visib_path) if visib_path.exists() else None
    if visib is not None and visib.sum() > 0:
        inside = float((visib & silhouette).sum() / visib.sum())
        if inside < cfg_qa.mask_iou:
            disagree.append(f"{1 - inside:.1%} of mask_visib/{name} lies outside the model at the pose")
    if disagree:  # a wrong pose: its depth disagrees too, reported once here
        return [("mask_mismatch", "; ".join(disagree))]
    depth_path = scene_dir / "depth" / f"{im_id:06d}.png"
    if visib is not None and depth_path.exists():
        measured = np.asarray(Image.open(depth_path), dtype=np.float64) * depth_scale
        valid = visib & silhouette & (measured > 0)
        if valid.sum() >= 10:
            error = float(np.median(np.abs(measured[valid] - depth_render[valid])))
            if error > cfg_qa.depth_tol * model.diameter:
                return [("depth_mismatch", f"median |depth - rendered depth| = {error:.1f} mm in mask_visib")]
    return []


def image_size(scene_dir, im_id, camera_json):
    for sub in ("rgb", "gray"):
        for ext in (".png", ".jpg", ".jpeg", ".tif"):
            path = scene_dir / sub / f"{im_id:06d}{ext}"
            if path.exists():
                with Image.open(path) as im:
                    return (im.height, im.width), path
    if camera_json is not None:
        return (int(camera_json["height"]), int(camera_json["width"])), None
    raise BopFormatError(f"{scene_dir / 'rgb' / f'{im_id:06d}.png'}: image is missing")


def run_qa(root, splits, cfg_qa):
    """{check: [issue dicts]} over the splits of the BOP dataset at root; also the number of instances."""
    root = Path(root)
    infos = load_models_info(root)
    models = {}
    camera_json = read_json(root / "camera.json") if (root / "camera.json").exists() else None
    issues = {check: [] for check in CHECKS}
    image_hashes, pose_keys = {}, {}
    n_instances = n_images = 0
    for split in splits:
        for scene_dir in split_scenes(root, split):
            scene_id = int(scene_dir.name)
            scene_gt = read_json(scene_dir / "scene_gt.json")
            scene_camera = read_json(scene_dir / "scene_camera.json")
            info_path = scene_dir / "scene_gt_info.json"
            scene_info = read_json(info_path) if info_path.exists() else {}
            for key in sorted(scene_gt, key=int):
                im_id = int(key)
                n_images += 1
                cam = scene_camera.get(key)
                if cam is None or "cam_K" not in cam:
                    raise BopFormatError(f"{scene_dir / 'scene_camera.json'}: no cam_K for image {key}")
                size, image_path = image_size(scene_dir, im_id, camera_json)
                where = {"split": split, "scene_id": scene_id, "im_id": im_id}
                if image_path is not None:
                    digest = hashlib.sha1(np.asarray(Image.open(image_path)).tobytes()).hexdigest()
                    if digest in image_hashes:
                        first = image_hashes[digest]
                        issues["duplicate_image"].append(
                            where | {"gt_id": -1, "detail": f"same pixels as {first}"}
                        )
                    else:
                        image_hashes[digest] = f"{split}/{scene_id:06d}/{im_id:06d}"
                for gt_id, rec in enumerate(scene_gt[key]):
                    n_instances += 1
                    missing = [k for k in ("cam_R_m2c", "cam_t_m2c", "obj_id") if k not in rec]
                    if missing:
                        raise BopFormatError(
                            f"{scene_dir / 'scene_gt.json'}: image {key} instance {gt_id} has no {missing}"
                        )
                    obj_id = int(rec["obj_id"])
                    if obj_id not in infos:
                        raise BopFormatError(
                            f"{scene_dir / 'scene_gt.json'}: image {key} instance {gt_id}: obj_id {obj_id} is not in "
                            f"{root / 'models' / 'models_info.json'}"
                        )
                    if obj_id not in models:
                        models[obj_id] = Model(root, obj_id, infos[obj_id])
                    problems = check_instance(
                        rec, cam["cam_K"], size, models[obj_id], scene_dir, im_id, gt_id,
                        float(cam.get("depth_scale", 1.0)), cfg_qa,
                    )  # fmt: skip
                    pose_ok = not problems
                    gt_infos = scene_info.get(key) or []
                    if pose_ok and gt_id < len(gt_infos):
                        R = np.asarray(rec["cam_R_m2c"], float).reshape(3, 3)
                        verts_cam = models[obj_id].verts @ R.T + np.asarray(rec["cam_t_m2c"], float)
                        problems = check_info(
                            gt_infos[gt_id], verts_cam, cam["cam_K"], size, scene_dir, im_id, gt_id, cfg_qa
                        )
                    for check, detail in problems:
                        issues[check].append(where | {"gt_id": gt_id, "obj_id": obj_id, "detail": detail})
                    if pose_ok:
                        # same object, same pose to 0.01 mm / 1e-5: a copied label
                        R = np.round(np.asarray(rec["cam_R_m2c"], float), 5)
                        t = np.round(np.asarray(rec["cam_t_m2c"], float), 2)
                        pose_key = (obj_id, R.tobytes(), t.tobytes())
                        if pose_key in pose_keys:
                            issues["duplicate_pose"].append(
                                where
                                | {
                                    "gt_id": gt_id,
                                    "obj_id": obj_id,
                                    "detail": f"same pose as {pose_keys[pose_key]}",
                                }
                            )
                        else:
                            pose_keys[pose_key] = f"{split}/{scene_id:06d}/{im_id:06d}/{gt_id}"
                for gt_id, detail in check_overlap(scene_dir, im_id, range(len(scene_gt[key])), cfg_qa):
                    issues["visib_overlap"].append(where | {"gt_id": gt_id, "detail": detail})
    return issues, n_images, n_instances


def write_report(out_dir, root, splits, issues, n_images, n_instances, max_listed=20):
    counts = {check: len(found) for check, found in issues.items()}
    total = sum(counts.values())
    report = {
        "checklist_item": CHECKLIST_ITEM,
        "dataset": str(root),
        "splits": list(splits),
        "images": n_images,
        "instances": n_instances,
        "errors": total,
        "passed": total == 0,
        "counts": counts,
        "issues": issues,
    }
    lines = [
        "# Label QA report",
        "",
        f"Serves: {CHECKLIST_ITEM}.",
        "",
        f"Dataset `{root}`, splits {', '.join(splits)}: {n_images} images, {n_instances} annotated instances.",
        "",
        f"**{'PASSED' if total == 0 else 'FAILED'}**: {total} issue(s).",
        "",
        "| check | issues |",
        "|---|---|",
        *[f"| {check} | {counts[check]} |" for check in CHECKS],
        "",
        "`labels.png`: images with the model drawn at the labelled pose (green) and its box (yellow);",
        "look at it (checklist: a sample of labels has been looked at with your own eyes).",
        "",
    ]
    for check in CHECKS:
        if issues[check]:
            lines += [f"## {check}", "", "| split | scene | im | gt | detail |", "|---|---|---|---|---|"]
            for issue in issues[check][:max_listed]:
                lines.append(
                    f"| {issue['split']} | {issue['scene_id']} | {issue['im_id']} | {issue['gt_id']} | {issue['detail']} |"
                )
            if len(issues[check]) > max_listed:
                lines.append(f"| ... | | | | {len(issues[check]) - max_listed} more in report.json |")
            lines.append("")
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", "\n".join(lines))
    return report


def label_sheet(root, split, path, n=16, min_size=128):
    """A grid of `n` images of `split` (evenly spaced) with every labelled instance's model silhouette at its
    pose overlaid in green (torchvision drawing utils) and its box in yellow: for the checklist item "a
    sample of labels has been looked at with your own eyes". Tiles keep the frames' aspect, at least
    `min_size` px high (up to twice that for large frames)."""
    import torch
    import torchvision
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

    root = Path(root)
    infos = load_models_info(root)
    entries = []
    for scene_dir in split_scenes(root, split):
        scene_gt = read_json(scene_dir / "scene_gt.json")
        scene_camera = read_json(scene_dir / "scene_camera.json")
        entries += [(scene_dir, key, scene_gt[key], scene_camera[key]) for key in scene_gt]
    tiles, models = [], {}
    for index in np.linspace(0, len(entries) - 1, min(n, len(entries))).astype(int):
        scene_dir, key, recs, cam = entries[index]
        (height, width), image_path = image_size(scene_dir, int(key), {"height": 0, "width": 0})
        if image_path is None:
            continue
        image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1)
        K = np.asarray(cam["cam_K"], float).reshape(3, 3)
        scale = max(1, int(np.ceil(min_size / max(height, width))))
        image = torch.nn.functional.interpolate(image[None], scale_factor=scale, mode="nearest")[0]
        # nearest upsampling by `scale`: pixel centres map as u' + 0.5 = scale (u + 0.5)
        K_up = np.diag([scale, scale, 1.0]) @ K + [
            [0, 0, (scale - 1) / 2],
            [0, 0, (scale - 1) / 2],
            [0, 0, 0],
        ]
        for rec in recs:
            obj_id = int(rec["obj_id"])
            if obj_id not in models and obj_id in infos:
                models[obj_id] = Model(root, obj_id, infos[obj_id])
            if obj_id not in models:
                continue
            R, t = np.asarray(rec["cam_R_m2c"], float).reshape(3, 3), np.asarray(rec["cam_t_m2c"], float)
            model = models[obj_id]
            silhouette = (
                rasterize(model.verts @ R.T + t, model.faces, K_up, height * scale, width * scale) > 0
            )
            image = draw_segmentation_masks(image, torch.from_numpy(silhouette), alpha=0.4, colors="lime")
            if silhouette.any():
                ys, xs = np.nonzero(silhouette)
                box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]])
                image = draw_bounding_boxes(image, box, colors="yellow")
        tile_height = int(np.clip(height * scale, min_size, 2 * min_size))
        tile_width = max(1, round(tile_height * width / height))
        tiles.append(
            torchvision.transforms.v2.functional.resize(image, [tile_height, tile_width], antialias=False)
        )
    # frames of different sizes: pad every tile to the largest
    h_max, w_max = max(tile.shape[1] for tile in tiles), max(tile.shape[2] for tile in tiles)
    tiles = [
        torch.nn.functional.pad(tile, (0, w_max - tile.shape[2], 0, h_max - tile.shape[1])) for tile in tiles
    ]
    grid = make_grid(torch.stack(tiles), nrow=int(np.ceil(np.sqrt(len(tiles)))), padding=2)
    with atomic_path(path) as tmp:
        torchvision.io.write_png(grid, str(tmp))


QA_DEFAULTS = {
    "splits": None,
    "rotation_tol": 1e-4,
    "mask_iou": 0.9,
    "depth_tol": 0.05,
    "info_tol": 0.02,
    "bbox_tol": 2,
}


def qa_settings(cfg):
    """cfg.data.qa over the defaults (a data config without a qa section still works); splits default
    to every split in cfg.data.splits."""
    settings = OmegaConf.merge(QA_DEFAULTS, cfg.data.get("qa") or {})
    if settings.splits is None:
        settings.splits = list(dict.fromkeys(cfg.data.splits.values()))
    return settings


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig):
    try:
        if OmegaConf.is_missing(cfg.data, "root"):
            raise BopFormatError(
                "data.root: not set; pass data.root=<BOP dataset root> (the folder with models/)"
            )
        settings = qa_settings(cfg)
        run = tracking.start_run(cfg, "qa")
        out_dir = Path(cfg.paths.data) / "qa"
        issues, n_images, n_instances = run_qa(cfg.data.root, settings.splits, settings)
        report = write_report(out_dir, cfg.data.root, settings.splits, issues, n_images, n_instances)
        label_sheet(cfg.data.root, settings.splits[0], out_dir / "labels.png")
        run.log({f"qa/{k}": v for k, v in report["counts"].items()} | {"qa/errors": report["errors"]})
        run.finish()
    except (BopFormatError, OSError) as e:
        print(f"qa failed: {e}", file=sys.stderr)
        sys.exit(1)
    summary = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if v) or "no issues"
    print(f"label QA of {n_instances} instances in {n_images} images: {summary} -> {out_dir / 'report.md'}")
    if report["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
