"""Zoom-in crops (CDPN / GDR-Net "dynamic zoom-in"): a square window around an object's box, resized to
the network's input size, with the intrinsics of the crop derived exactly.

Pixel centres sit at integer coordinates (BOP/OpenCV): pixel i covers [i - 0.5, i + 0.5]. A BOP box
[x, y, w, h] covers pixels x .. x + w - 1, so its centre is (x + (w - 1) / 2, y + (h - 1) / 2). A window
is (cx, cy, side): the square [cx - side/2, cx + side/2] x [cy - side/2, cy + side/2] of the frame. Resized
to S x S pixels (s = S / side), a frame pixel u lands at u' = (u - (cx - side/2)) s - 0.5, so

    K_crop = [[fx s, skew s, (K_cx - cx + side/2) s - 0.5],
              [0,    fy s,   (K_cy - cy + side/2) s - 0.5],
              [0,    0,      1]]

and every model point projects into the crop through K_crop exactly where it projects into the frame
through K, shifted and scaled. R and t are those of the frame's camera: a crop changes K only.

The detections file (BOP default-detections format, e.g. from a 2D detector) is a JSON list of
{"scene_id", "image_id", "category_id", "bbox": [x, y, w, h], "score"} (other keys ignored).
"""

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align

from .models import BopFormatError


def box_window(bbox, pad=1.5):
    """(cx, cy, side) of the square window around box [x, y, w, h]: centred on it, side = pad * max(w, h)."""
    x, y, w, h = (float(v) for v in bbox)
    return x + (w - 1) / 2, y + (h - 1) / 2, pad * max(w, h, 1.0)


def jitter_window(bbox, pad, shift, scale, generator=None):
    """box_window with CDPN's dynamic zoom-in jitter: the centre moves by up to `shift` x (w, h) and the
    side is scaled by a factor in [1 - scale, 1 + scale], uniformly (torch's generator)."""
    x, y, w, h = (float(v) for v in bbox)
    u = torch.rand(3, generator=generator).double().numpy() * 2 - 1
    cx, cy, side = box_window(bbox, pad)
    return cx + u[0] * shift * w, cy + u[1] * shift * h, side * (1 + u[2] * scale)


def crop_intrinsics(K, window, size):
    """K (3x3, numpy or torch) of the frame -> K of the window resized to size x size (module docstring)."""
    cx, cy, side = window
    s = size / side
    K_crop = K.clone() if isinstance(K, torch.Tensor) else np.array(K, dtype=np.float64, copy=True)
    K_crop[0, :2] = K[0, :2] * s
    K_crop[1, 1] = K[1, 1] * s
    K_crop[0, 2] = (K[0, 2] - cx + side / 2) * s - 0.5
    K_crop[1, 2] = (K[1, 2] - cy + side / 2) * s - 0.5
    return K_crop


def crop_image(image, window, size):
    """The window of a 3xHxW image (uint8 or float) resized to float32 3 x size x size, same value range.

    torchvision's roi_align with aligned=True samples the frame at exactly the pixel centres above and
    averages ceil(side / size)^2 samples per output pixel (antialiased when zooming out); outside the
    frame it reads zeros (black), as GDR-Net's crops do.
    """
    cx, cy, side = (float(v) for v in window)
    left, top = cx - side / 2, cy - side / 2
    # roi_align (aligned=True) reads box coordinate b at pixel index b - 0.5: shift by +0.5
    box = torch.tensor([[0.0, left + 0.5, top + 0.5, left + side + 0.5, top + side + 0.5]])
    out = roi_align(image.float().unsqueeze(0), box, output_size=int(size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)  # fmt: skip
    return out[0]


def box_iou(a, b):
    """IoU of two boxes [x, y, w, h]."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def load_detections(path, min_score=0.0):
    """{(scene_id, im_id, obj_id): [(bbox float64 (4,), score), ...] best first} from a BOP detections file.

    Every entry is checked: a BopFormatError names the file, the entry's index and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise BopFormatError(f"{path}: detections file is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BopFormatError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(raw, list):
        raise BopFormatError(f"{path}: expected a list of detections (BOP format), got {type(raw).__name__}")
    detections = {}
    for i, det in enumerate(raw):
        where = f"{path}: detection {i}"
        if not isinstance(det, dict):
            raise BopFormatError(f"{where} is not an object")
        missing = [k for k in ("scene_id", "image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise BopFormatError(f"{where} has no {', '.join(repr(k) for k in missing)}")
        ids = []
        for k in ("scene_id", "image_id", "category_id"):
            value = det[k]
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise BopFormatError(f"{where}: {k}={value!r} is not an integer")
            ids.append(int(value))
        try:
            bbox = np.asarray(det["bbox"], dtype=np.float64).reshape(-1)
            score = float(det["score"])
        except (TypeError, ValueError) as e:
            raise BopFormatError(f"{where}: bbox must be 4 numbers and score a number ({e})") from e
        if bbox.size != 4 or not np.all(np.isfinite(bbox)):
            raise BopFormatError(f"{where}: bbox {det['bbox']!r} is not 4 finite numbers [x, y, w, h]")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise BopFormatError(f"{where}: bbox {det['bbox']!r} has a width or height <= 0 ([x, y, w, h])")
        if not np.isfinite(score):
            raise BopFormatError(f"{where}: score {det['score']!r} is not finite")
        if score >= min_score:
            detections.setdefault(tuple(ids), []).append((bbox, score))
    for boxes in detections.values():
        boxes.sort(key=lambda d: -d[1])
    return detections


def match_detection(candidates, gt_bbox, min_iou):
    """The candidate box overlapping `gt_bbox` most (ties: the higher score), or None below min_iou."""
    best, best_iou = None, -1.0
    for bbox, _ in candidates:  # best score first, so a tie keeps the higher score
        iou = box_iou(bbox, gt_bbox)
        if iou > best_iou:
            best, best_iou = bbox, iou
    return best if best is not None and best_iou >= min_iou and best_iou > 0 else None
