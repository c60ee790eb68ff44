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


def duplicate_fraction(result):
    """The largest share of a split's inputs that are copies of another split's, in a `duplicates` result."""
    return max((v[k] for v in result.values() for k in v if k.startswith("fraction")), default=0.0)


PENALTIES = 10.0 ** np.arange(-2, 7)  # ridge penalties tried on standardized features


def _ridge_loo_r2(x, y, penalties=PENALTIES):
    """Leave-one-out R^2 per target of a ridge regression on standardized features, its penalty chosen per
    target by the same leave-one-out error (closed form from one SVD, as sklearn's RidgeCV computes it;
    written here because sklearn is not a dependency). Out-of-sample without a split: the number does not
    depend on how small the validation set is, and more features cannot buy R^2 by overfitting."""
    s = x.std(0)
    a = (x - x.mean(0)) / np.where(s > 1e-8, s, 1.0)
    yc = y - y.mean(0)
    u, sv, _ = np.linalg.svd(a, full_matrices=False)
    uty = u.T @ yc
    best = np.full(y.shape[1], np.inf)
    for penalty in penalties:
        shrink = sv**2 / (sv**2 + penalty)
        hat = (u**2) @ shrink + 1.0 / len(a)  # leverage of each sample (the intercept's 1/n included)
        loo = (yc - u @ (shrink[:, None] * uty)) / (1 - hat)[:, None]
        best = np.minimum(best, (loo**2).sum(0))
    return 1 - best / np.maximum((yc**2).sum(0), 1e-12)


def _trivial_features(x, sizes=(2, 4, 8, 16, 32)):
    """name -> [N, F] features of trivial models: per-channel global statistics (mean, std, min, max) and, for
    images, the image average-pooled to k x k per channel (a thumbnail: the layout, noise averaged out)."""
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


def _above_chance(r2, chance):
    """R^2 as the share of the variance that chance leaves unexplained: (R^2 - chance) / (1 - chance)."""
    return float((r2 - chance) / (1 - chance)) if chance < 1 else 0.0


def shortcut_probe(task, max_features=4096, remeasure_r2=0.4, permutations=4, seed=0):
    """Can a trivial model predict the target? Measured on the training items, the data a model learns a
    shortcut from (out of sample by leave-one-out, so a small or differently drawn validation set does not
    make the numbers noisy):

    - single input value: the best one-variable linear fit of each target component on ONE input value,
      R^2 (a leaked answer sits in a few pixels; real content never pins a target on one pixel),
    - trivial models (`_trivial_features`): ridge regression on global image statistics and on 2x2 ... 32x32
      thumbnails, leave-one-out R^2; a leak spread over many pixels, each too noisy alone, or carried by
      brightness or contrast, or drawn as a shape (a bar whose length is the answer), shows here. A linear
      model on a thumbnail does not recover a 6D pose from object-centred images (R^2 <= 0.3 on the
      example's capture). When the best trivial model reaches `remeasure_r2`, its target is re-measured with
      every trivial model on per-image standardized inputs (`trivial_model_r2_per_image_standardized`, the
      best of them): the R^2 falling says the answer is in each image's global statistics (brightness,
      contrast, colour balance), staying, in its layout. `shortcut_found` decides from these numbers.

    The best of thousands of fits explains some variance by chance, a lot on few samples (best one-value
    R^2 ~ 0.7 on 16 samples). Every R^2 is reported above chance (`_above_chance`), the chance level being
    the same best fit to the targets shuffled across samples (mean over `permutations` shuffles): ~0.01
    on the example's 2 048 training samples.
    """

    items = list(task.train_items)
    x_in = torch.stack([torch.as_tensor(get_input(it, task.input_key)).float() for it in items])
    x = x_in.reshape(len(x_in), -1)
    if x.shape[1] > max_features:  # evenly spaced subset keeps the probe cheap on big inputs
        x = x[:, torch.linspace(0, x.shape[1] - 1, max_features).long()]
    x = x.numpy().astype(np.float64)
    y = task.target_fn(collate(items)).numpy().astype(np.float64)
    keep = y.std(0) > 0
    y = y[:, keep]
    k = y.shape[1]
    rng = np.random.default_rng(seed)
    # the real targets, then `permutations` shuffled copies: the chance level costs no extra fit
    y_all = np.concatenate([y] + [y[rng.permutation(len(y))] for _ in range(permutations)], 1)

    def real_and_chance(r2):  # r2 per column of y_all -> (best real R^2, its target, chance level)
        shuffled = r2[k:].reshape(permutations, k).max(1)
        return r2[:k].max(), int(np.argmax(r2[:k])), float(shuffled.mean())

    # one-value fits: R^2 of a line through (value, target) = squared correlation, per (value, target)
    xz, yz = x - x.mean(0), y_all - y_all.mean(0)
    norms = np.sqrt((xz**2).sum(0))[:, None] * np.sqrt((yz**2).sum(0))[None, :]
    r2_value = np.where(norms > 1e-12, (xz.T @ yz) / np.maximum(norms, 1e-12), 0.0) ** 2  # [values, columns]
    value_r2, value_target, value_chance = real_and_chance(r2_value.max(0)) if k else (0.0, -1, 0.0)
    value_index = int(np.argmax(r2_value[:, value_target])) if k else -1
    # trivial models: name -> (best R^2 above chance, its target, chance level)
    features = _trivial_features(x_in)
    trivial = {name: real_and_chance(_ridge_loo_r2(f, y_all)) for name, f in features.items()} if k else {}
    above = {name: _above_chance(r2, chance) for name, (r2, _, chance) in trivial.items()}
    top = max(above, key=above.get, default=None)
    result = {
        "n": len(items),
        "best_single_value_r2": _above_chance(value_r2, value_chance) if k else 0.0,
        "best_single_value_chance_r2": value_chance,
        "best_single_value_index": value_index,
        "best_single_value_target": int(np.flatnonzero(keep)[value_target]) if k else -1,
        "input_statistics_r2": above.get("global statistics", 0.0),
        "trivial_model_r2": above[top] if top else 0.0,
        "trivial_model_chance_r2": trivial[top][2] if top else 0.0,
        "trivial_model": top,
        "trivial_model_target": int(np.flatnonzero(keep)[trivial[top][1]]) if top else -1,
        "trivial_models_r2": above,
    }
    if top and result["trivial_model_r2"] >= remeasure_r2:
        j = trivial[top][1]
        columns = y_all[:, j::k]  # target j, then its shuffled copies
        standardized = _trivial_features(_per_image_standardized(x_in))
        r2 = [_ridge_loo_r2(f, columns) for f in standardized.values()]
        result["trivial_model_r2_per_image_standardized"] = max(
            _above_chance(r[0], float(r[1:].mean())) for r in r2
        )
    return result


def shortcut_found(sc, th):
    """What `shortcut_probe`'s numbers `sc` say under the doctor's thresholds `th`: "single value" or "trivial
    model" (R^2 at or above `shortcut_r2`: no real content pins a target that well), "image statistics" (a
    weaker candidate, R^2 at or above `shortcut_candidate_r2`, confirmed by removing the statistic: with
    every image standardized on its own the best trivial model keeps at most `shortcut_confirm_share` of
    it, so the answer rode on each image's brightness, contrast or colour balance, not on what it shows),
    or None."""
    if sc["best_single_value_r2"] >= th.shortcut_r2:
        return "single value"
    if sc["trivial_model_r2"] >= th.shortcut_r2:
        return "trivial model"
    if sc["trivial_model_r2"] >= th.shortcut_candidate_r2 and carried_by_image_statistics(sc, th):
        return "image statistics"
    return None


def carried_by_image_statistics(sc, th):
    """Did standardizing every image on its own take the best trivial model's R^2 down to at most
    `shortcut_confirm_share` of it? (False when it was not re-measured.)"""
    after = sc.get("trivial_model_r2_per_image_standardized")
    return after is not None and after <= th.shortcut_confirm_share * sc["trivial_model_r2"]
