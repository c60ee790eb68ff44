"""Stage 2: a detections file in the BOP default-detections format, made from ground-truth boxes with
noise, as a 2D detector would hand it to a pose estimator: a JSON list of

    {"scene_id", "image_id", "category_id": obj_id, "bbox": [x, y, w, h] (px), "score", "time": -1.0}

(`time` -1: no detector ran). The scene capture (data/scenes.py) writes one per split; the noise is
data.scenes.detections: box jitter, dropped instances, false detections, score ranges.
"""

import numpy as np


def detections_for(rng, det, scene_id, im_id, gts, infos, size, obj_ids):
    """BOP default detections of one frame from its GT boxes (bbox_visib): each instance at least
    det.min_visib_fract visible is detected unless dropped (probability det.drop), its box's centre moved
    by N(0, jitter) x its size and each side scaled by exp(N(0, jitter)), score in det.score; plus
    Poisson(det.false_per_image) false detections of random objects and boxes, score in det.false_score."""
    height, width = size
    jitter = float(det.jitter)

    def entry(obj_id, box, score):
        x0, y0 = np.clip(box[0], 0, width - 1), np.clip(box[1], 0, height - 1)
        x1, y1 = np.clip(box[0] + box[2], x0 + 1, width), np.clip(box[1] + box[3], y0 + 1, height)
        bbox = [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]
        return {"scene_id": scene_id, "image_id": im_id, "category_id": int(obj_id), "bbox": bbox,
                "score": round(float(score), 4), "time": -1.0}  # fmt: skip

    out, sides = [], []
    for gt, info in zip(gts, infos, strict=True):
        x, y, w, h = (float(v) for v in info["bbox_visib"])
        if info["visib_fract"] < float(det.min_visib_fract) or w <= 0:
            continue
        sides.append((w, h))
        shift = rng.normal(0, jitter, size=2) * (w, h)
        scale = np.exp(rng.normal(0, jitter, size=2))
        if rng.random() < float(det.drop):
            continue
        nw, nh = w * scale[0], h * scale[1]
        cx, cy = x + w / 2 + shift[0], y + h / 2 + shift[1]
        out.append(entry(gt["obj_id"], (cx - nw / 2, cy - nh / 2, nw, nh), rng.uniform(*det.score)))
    for _ in range(int(rng.poisson(float(det.false_per_image)))):
        w, h = sides[int(rng.integers(len(sides)))] if sides else (width / 5, height / 5)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        obj_id = obj_ids[int(rng.integers(len(obj_ids)))]
        out.append(entry(obj_id, (x, y, w, h), rng.uniform(*det.false_score)))
    return out
