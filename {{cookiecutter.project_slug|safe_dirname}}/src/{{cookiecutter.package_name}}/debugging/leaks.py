"""Is the answer in the input? The doctor's leak checks, usable on any model's data (items as `runs.take_items`
yields them):

    duplicates({"train": items, "val": items})          # validation inputs copied from training
    shortcut_probe(task)                                # does one input value, or a trivial model, predict a target?
"""

import hashlib

import numpy as np
import torch
from torch import nn

from ..batches import collate
from .runs import get_input


def _hash(x):
    # quantized (8 bits for [0, 1] images, 4 decimals otherwise) so a re-encoded copy still matches
    x = torch.as_tensor(x).float().cpu()
    if x.numel() and x.min() >= 0 and x.max() <= 1:
        q = (x * 255).round().to(torch.uint8).numpy()
    else:
        q = (x * 1e4).round().to(torch.int64).numpy()
    return hashlib.sha1(q.tobytes()).hexdigest()


def duplicates(splits, input_key="image"):
    """Exact duplicate inputs across splits (8-bit quantized hash). `splits` maps a name to its items."""
    hashes = {name: {_hash(get_input(it, input_key)) for it in items} for name, items in splits.items()}
    names = list(splits)
    result = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = len(hashes[a] & hashes[b])
            result[f"{a}/{b}"] = {"shared": shared, "fraction_of_" + b: shared / max(1, len(splits[b]))}
    return result


def _ridge_r2(xtr, ytr, xva, yva, ridge=1.0):
    """Validation R^2 per target of a ridge regression on standardized features (closed form)."""
    m, s = xtr.mean(0), xtr.std(0)
    s = np.where(s > 1e-8, s, 1.0)
    A = np.c_[(xtr - m) / s, np.ones(len(xtr))]
    B = np.c_[(xva - m) / s, np.ones(len(xva))]
    penalty = ridge * np.eye(A.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    w = np.linalg.solve(A.T @ A + penalty, A.T @ ytr)
    sst = ((yva - yva.mean(0)) ** 2).sum(0)
    return 1 - ((B @ w - yva) ** 2).sum(0) / np.maximum(sst, 1e-12)


def _trivial_features(x, sizes=(2, 4, 8)):
    """name -> [N, F] features of trivial models: per-channel global statistics (mean, std, min, max) and, for
    images, the image average-pooled to k x k per channel (a thumbnail: the coarse layout, noise averaged out)."""
    chans = x.reshape(len(x), x.shape[1], -1) if x.ndim > 2 else x.reshape(len(x), 1, -1)
    out = {"global statistics": torch.cat([chans.mean(-1), chans.std(-1), chans.amin(-1), chans.amax(-1)], 1)}
    if x.ndim == 4:
        for k in sizes:
            if k <= min(x.shape[-2:]):
                out[f"{k}x{k} thumbnail"] = nn.functional.adaptive_avg_pool2d(x, k).reshape(len(x), -1)
    return {name: f.numpy().astype(np.float64) for name, f in out.items()}


def _per_image_standardized(x):
    """Each image (each channel) shifted and scaled to mean 0, std 1: removes its global statistics."""
    if x.ndim < 3:
        return x
    dims = tuple(range(2, x.ndim))
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True).clamp_min(1e-6)


def shortcut_probe(task, max_features=4096, confirm_r2=0.9):
    """Can a trivial model predict the target? Trivial models, fitted on the training items and scored by
    R^2 on the validation items:

    - single input value: the best one-variable linear fit of each target component on ONE pixel
      (a leaked answer sits in a few pixels; real content never pins a target on one pixel),
    - trivial models (`_trivial_features`): ridge regression on global image statistics and on 2x2, 4x4
      and 8x8 thumbnails; a leak spread over many pixels, each too noisy alone, or carried by brightness or
      contrast, shows here. A linear model on a thumbnail does not recover a 6D pose from object-centred
      images (R^2 <= 0.3 on the example's capture), so near-perfect R^2 means the answer is written into the
      image. The best trivial model at or above `confirm_r2` is re-measured on per-image standardized inputs:
      the R^2 falling says the answer is in each image's global statistics; staying, in its coarse layout.
    """

    def inputs(items):
        return torch.stack([torch.as_tensor(get_input(it, task.input_key)).float() for it in items])

    def flat(x):
        f = x.reshape(len(x), -1)
        if f.shape[1] > max_features:  # evenly spaced subset keeps the probe cheap on big inputs
            f = f[:, torch.linspace(0, f.shape[1] - 1, max_features).long()]
        return f.numpy().astype(np.float64)

    def targets(items):
        return task.target_fn(collate(items)).numpy().astype(np.float64)

    xtr_in, xva_in = inputs(task.train_items), inputs(task.val_items)
    xtr, xva = flat(xtr_in), flat(xva_in)
    ytr, yva = targets(task.train_items), targets(task.val_items)
    keep = ytr.std(0) > 0
    ytr, yva = ytr[:, keep], yva[:, keep]
    # one-pixel fits: slope/intercept per (pixel, target) from training correlations, scored on val
    xm, xs = xtr.mean(0), xtr.std(0)
    ym = ytr.mean(0)
    valid = xs > 1e-8
    xz = (xtr[:, valid] - xm[valid]) / xs[valid]
    cov = xz.T @ (ytr - ym) / len(xtr)  # [pixels, targets]: slope in standardized x
    pred = ((xva[:, valid] - xm[valid]) / xs[valid])[:, :, None] * cov[None] + ym[None, None]
    sse = ((pred - yva[:, None, :]) ** 2).sum(0)
    sst = ((yva - yva.mean(0)) ** 2).sum(0)
    r2_pixel = 1 - sse / np.maximum(sst, 1e-12)  # [pixels, targets]
    best = np.unravel_index(np.argmax(r2_pixel), r2_pixel.shape) if r2_pixel.size else (0, 0)
    pixel_index = int(np.flatnonzero(valid)[best[0]]) if r2_pixel.size else -1
    # trivial models: name -> R^2 per target
    ftr, fva = _trivial_features(xtr_in), _trivial_features(xva_in)
    r2_trivial = {name: _ridge_r2(ftr[name], ytr, fva[name], yva) for name in ftr} if ytr.shape[1] else {}
    top = max(r2_trivial, key=lambda n: r2_trivial[n].max(), default=None)
    result = {
        "best_single_value_r2": float(r2_pixel.max()) if r2_pixel.size else 0.0,
        "best_single_value_index": pixel_index,
        "best_single_value_target": int(np.flatnonzero(keep)[best[1]]) if r2_pixel.size else -1,
        "input_statistics_r2": float(r2_trivial["global statistics"].max()) if r2_trivial else 0.0,
        "trivial_model_r2": float(r2_trivial[top].max()) if top else 0.0,
        "trivial_model": top,
        "trivial_model_target": int(np.flatnonzero(keep)[np.argmax(r2_trivial[top])]) if top else -1,
        "trivial_models_r2": {name: float(r.max()) for name, r in r2_trivial.items()},
    }
    if top and result["trivial_model_r2"] >= confirm_r2:
        j = int(np.argmax(r2_trivial[top]))
        str_, sva = (_trivial_features(_per_image_standardized(x))[top] for x in (xtr_in, xva_in))
        after = _ridge_r2(str_, ytr[:, j : j + 1], sva, yva[:, j : j + 1])
        result["trivial_model_r2_per_image_standardized"] = float(after[0])
    return result
