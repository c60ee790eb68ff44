"""The one way poses are drawn for people: the object's x, y, z axes projected onto an image (training's
prediction grid, evaluation's predictions.png, error analysis' contact sheet); and `label_drawing`, poses
drawn for the doctor's augmentation check."""

import math

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from . import geometry

AXIS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # x red, y green, z blue


def axes_pixels(R, t, K, length_mm):
    """Pixels [4, 2] of the object origin and its x, y, z axis tips (length_mm), or None when a point is
    behind the camera or does not project."""
    R, t, K = (np.asarray(a, dtype=np.float64) for a in (R, t, K))
    cam = np.vstack([np.zeros(3), np.eye(3) * length_mm]) @ R.T + t
    if not (np.isfinite(cam).all() and (cam[:, 2] > 0).all()):
        return None
    return (cam @ K.T)[:, :2] / cam[:, 2:]


def draw_axes(image, R, t, K, length_mm, shade=255, width=1, color=None):
    """uint8 3xHxW image with the axes drawn: each axis in its colour (AXIS_COLORS scaled to `shade`), or all
    in `color`. PIL's ImageDraw rather than torchvision.utils.draw_keypoints, which draws every connecting
    line white whatever `colors` says, so the axes could not be told apart."""
    uv = axes_pixels(R, t, K, length_mm)
    if uv is None:
        return image
    size = max(image.shape[-2:])
    origin, *tips = [tuple(p) for p in uv.clip(-10 * size, 11 * size).tolist()]
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    for axis, tip in enumerate(tips):
        fill = color or tuple(round(c * shade / 255) for c in AXIS_COLORS[axis])
        draw.line([origin, tip], fill=tuple(fill), width=width)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)


def enlarged(image, K, min_size):
    """Nearest-neighbour enlargement so the axes stay readable on tiny images, with K scaled to match."""
    scale = max(1, math.ceil(min_size / max(image.shape[-2:])))
    K = np.array(K, dtype=np.float64)
    K[:2] *= scale
    K[:2, 2] += 0.5 * (scale - 1)  # pixel centres sit at integer coordinates
    return image.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1), K, scale


def pose_grid(images, K, true_poses, predicted_poses, length_mm, min_size=0):
    """Images (float [N,3,H,W] in [0,1]) with the true (dark) and predicted (bright) axes, as one grid."""
    drawn = []
    for i, image in enumerate(images):
        image = (torch.as_tensor(image).clamp(0, 1) * 255).to(torch.uint8).cpu()
        image, k, scale = enlarged(image, K[i], min_size)
        for (R, t), shade in ((true_poses[i], 110), (predicted_poses[i], 255)):
            image = draw_axes(image, R, t, k, length_mm, shade, width=scale)
        drawn.append(image)
    return torchvision.utils.make_grid(drawn, nrow=max(1, math.ceil(math.sqrt(len(drawn)))), padding=2)


def label_drawing(points, K, R, t, size, sigma=1.0):
    """Poses drawn as images [B, 3, H, W] for checks, not for people: each sample's model points (mm, [N, 3])
    projected under its pose, each a Gaussian blob of `sigma` pixels coloured by its object coordinates
    (x, y, z scaled to [0, 1] over the model). Unlike a silhouette the colours turn with the object, so a
    turn about the object's own axis changes the drawing too. A splat rather than a rendering: it needs no
    mesh, and a smooth drawing survives an image warp's interpolation (warped and redrawn agree)."""
    H, W = size
    uv = geometry.project(points, R, t, K)  # [B, N, 2]
    lo, hi = points.min(0).values, points.max(0).values
    colours = (points - lo) / (hi - lo).clamp_min(1e-9)  # [N, 3]
    xs = torch.arange(W, dtype=uv.dtype, device=uv.device)
    ys = torch.arange(H, dtype=uv.dtype, device=uv.device)
    wx = torch.exp(-((xs - uv[..., :1]) ** 2) / (2 * sigma**2))  # [B, N, W]
    wy = torch.exp(-((ys - uv[..., 1:]) ** 2) / (2 * sigma**2))  # [B, N, H]
    return torch.einsum("bnh,bnw,nc->bchw", wy, wx, colours.to(uv.dtype))
