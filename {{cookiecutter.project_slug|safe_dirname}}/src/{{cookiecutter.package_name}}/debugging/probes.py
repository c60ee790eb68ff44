"""Failure-mode probes: one function per diagnostic of the talk's "Failure Modes in Deep Learning" table.

Every probe works on any PyTorch model and data:

    task = Task(model_factory=lambda: MyNet(), criterion=lambda out, batch: F.mse_loss(out, batch[1]),
                train_items=take_items(train_loader, 256), val_items=take_items(val_loader, 128))
    run = train(task)                                   # short training: loss curves, per-sample val losses
    control = train(task, items=zero_inputs)            # Karpathy's input-independent baseline
    compare(run.val_losses, control.val_losses)         # did the model learn anything from its input?
    lr_range_test(task)                                 # LR range test (Smith 2017) with a suggestion
    batch_dependency(task.model_factory(), batch)       # does output i depend on input j != i (eval mode)?

Conventions: an *item* is one sample as a dataset returns it: a tuple/list `(input, target, ...)` or a
dict (`input_key` names the input, default "image"). `criterion(out, batch)` returns a scalar loss or
`(loss, parts)`. `optimizer_factory(model, lr)` returns an optimizer. Items are kept in memory: probes train
on a few hundred samples, which is the point of a cheap diagnosis.

Statistics are written with numpy on purpose (no scipy dependency): paired sign-flip permutation tests,
permutation tests for trends, percentile bootstrap CIs and the Wald-Wolfowitz runs test (normal approx.).
"""

import copy
import dataclasses
import hashlib
import math
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..batches import collate, to_device

# --- items and batches ---------------------------------------------------------------------------------------


def batch_size_of(batch, input_key="image"):
    return len(get_input(batch, input_key))


def get_input(batch, input_key="image"):
    if isinstance(batch, dict):
        if input_key not in batch:
            raise KeyError(f"probes: batch has no input key '{input_key}' (keys: {sorted(batch)})")
        return batch[input_key]
    return batch[0]


def set_input(batch, x, input_key="image"):
    """A copy of `batch` (or item) with its input replaced by `x`."""
    if isinstance(batch, dict):
        return {**batch, input_key: x}
    return type(batch)([x, *batch[1:]]) if isinstance(batch, list) else (x, *batch[1:])


def default_target(batch):
    """Target of a (input, target) batch, or of a dict batch with a "target" key, as [B, k] floats."""
    if isinstance(batch, dict):
        if "target" not in batch:
            raise KeyError("probes: dict batches need a target_fn (no 'target' key)")
        y = batch["target"]
    else:
        y = batch[1]
    y = torch.as_tensor(y).float()
    return y.reshape(len(y), -1)


def _slice(obj, i, n):
    if torch.is_tensor(obj) and obj.ndim > 0 and len(obj) == n:
        return obj[i]
    if isinstance(obj, np.ndarray) and obj.ndim > 0 and len(obj) == n:
        return obj[i]
    if isinstance(obj, dict):
        return {k: _slice(v, i, n) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        if len(obj) == n and not isinstance(obj, tuple):  # a collated list of strings / numbers
            return obj[i]
        return type(obj)(_slice(v, i, n) for v in obj)
    return obj


def unbatch(batch, input_key="image"):
    n = batch_size_of(batch, input_key)
    return [_slice(batch, i, n) for i in range(n)]


def take_items(source, n=None, input_key="image"):
    """The first `n` samples of a DataLoader (in the order it yields them) or of a Dataset, as items."""
    items = []
    if isinstance(source, DataLoader):
        for batch in source:
            items.extend(unbatch(batch, input_key))
            if n is not None and len(items) >= n:
                break
    else:
        count = len(source) if n is None else min(n, len(source))
        items = [source[i] for i in range(count)]
    return items[:n] if n is not None else items


def zero_inputs(items, input_key="image"):
    """Karpathy's input-independent baseline: every input set to zero, targets untouched."""
    return [set_input(it, torch.zeros_like(get_input(it, input_key)), input_key) for it in items]


def permute_inputs(items, seed=0, input_key="image"):
    """The shuffled-target control: item i keeps its target but gets the input of item perm[i], so targets
    are independent of inputs while both marginals are unchanged."""
    perm = np.random.default_rng(seed).permutation(len(items))
    return [
        set_input(it, get_input(items[j], input_key), input_key) for it, j in zip(items, perm, strict=True)
    ]


def loss_value(result):
    return result[0] if isinstance(result, tuple | list) else result


def adam_factory(model, lr):
    return torch.optim.Adam(model.parameters(), lr=lr)


@dataclasses.dataclass
class Task:
    """What the probes need to train and evaluate a model; nothing here is specific to a domain."""

    model_factory: object  # () -> nn.Module, a fresh model each call
    criterion: object  # (out, batch) -> loss | (loss, parts), mean over the batch
    train_items: list
    val_items: list
    optimizer_factory: object = adam_factory  # (model, lr) -> torch.optim.Optimizer
    lr: float = 1e-3
    batch_size: int = 32
    shuffle: bool = True
    epochs: int = 5
    max_steps: int | None = None  # whole epochs are cut so that a run takes at most this many steps
    grad_clip: float | None = None
    input_key: str = "image"
    target_fn: object = default_target  # batch -> [B, k] float targets (order and shortcut probes)
    device: str = "cpu"
    seed: int = 0

    def forward(self, model, batch):
        return model(get_input(batch, self.input_key))

    def loader(self, items, batch_size=None, shuffle=None, seed=None):
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return DataLoader(
            items,
            batch_size=batch_size or self.batch_size,
            shuffle=self.shuffle if shuffle is None else shuffle,
            collate_fn=collate,
            generator=generator,
            drop_last=False,
        )

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@torch.no_grad()
def per_sample_losses(task, model, items, batch_size=64, parts=None):
    """Eval-mode loss of every item (the criterion applied to one-sample slices of a batched forward).

    With a dict `parts`, the criterion's scalar parts (when it returns `(loss, parts)`) are appended to
    parts[name], one value per item: the probes treat every part as lower-is-better (errors, loss terms).
    """
    model.eval()
    losses = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = to_device(collate(chunk), task.device)
        out = task.forward(model, batch)
        n = len(chunk)
        for i in range(n):
            one = _slice(out, slice(i, i + 1), n)
            result = task.criterion(one, _slice(batch, slice(i, i + 1), n))
            losses.append(float(loss_value(result)))
            if parts is not None and isinstance(result, tuple | list) and len(result) > 1:
                for name, value in dict(result[1]).items():
                    if name != "loss" and (not torch.is_tensor(value) or value.numel() == 1):
                        parts.setdefault(name, []).append(float(value))
    return np.asarray(losses, dtype=np.float64)


# --- statistics ----------------------------------------------------------------------------------------------


def paired_test(a, b, n_perm=10000, seed=0):
    """One-sided paired sign-flip permutation test of mean(a - b) > 0 (a worse than b, for losses).

    Returns (p_value, relative difference mean(a - b) / mean(a)). Exact under the null that each pair's
    difference is symmetric around 0; no normality assumption, which per-sample losses never satisfy.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    if not np.all(np.isfinite(d)):
        finite = np.isfinite(d)
        if not finite.any():
            return (
                0.0 if np.nan_to_num(a.mean(), nan=np.inf) > np.nan_to_num(b.mean(), nan=np.inf) else 1.0
            ), 1.0
        d = d[finite]
        a = a[finite]
    observed = d.mean()
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, len(d)))
    null = (signs * np.abs(d)).mean(axis=1)
    p = (1 + np.sum(null >= observed - 1e-12)) / (n_perm + 1)
    scale = abs(a.mean()) if a.mean() != 0 else 1.0
    return float(p), float(observed / scale)


def trend_test(values, n_perm=10000, seed=0):
    """One-sided permutation test for a downward trend: (slope per step, p-value that it is < 0 by chance)."""
    y = np.asarray(values, np.float64)
    y = y[np.isfinite(y)]
    if len(y) < 3:
        return 0.0, 1.0
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    rng = np.random.default_rng(seed)
    null = np.array([(x * rng.permutation(y)).sum() for _ in range(n_perm)]) / (x * x).sum()
    p = (1 + np.sum(null <= slope)) / (n_perm + 1)
    return slope, float(p)


def bootstrap_ci(values, n_boot=2000, level=0.95, seed=0):
    """Percentile bootstrap CI of the mean: (mean, low, high)."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def runs_test(sequence):
    """Wald-Wolfowitz runs test above/below the median: (z, two-sided p). Too few runs (z << 0) means the
    sequence comes in blocks, e.g. sorted data."""
    s = np.asarray(sequence, np.float64)
    m = np.median(s)
    above = s[s != m] > m  # continuous values: the ties at the median carry no side
    if above.all() or not above.any():
        # a discrete target (a class indicator) is mostly ties: split at the median instead of dropping them
        above = s > m if (s > m).any() else s >= m
    s = above
    n1, n2 = int(s.sum()), int((~s).sum())
    if n1 == 0 or n2 == 0:
        return -math.inf, 0.0
    runs = 1 + int(np.sum(s[1:] != s[:-1]))
    mu = 2 * n1 * n2 / (n1 + n2) + 1
    var = 2 * n1 * n2 * (2 * n1 * n2 - n1 - n2) / ((n1 + n2) ** 2 * (n1 + n2 - 1))
    z = (runs - mu) / math.sqrt(var) if var > 0 else 0.0
    return float(z), float(math.erfc(abs(z) / math.sqrt(2)))


# --- training ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A probe's training run: curves and the final per-sample validation losses."""

    step_losses: list
    epoch_step_losses: list  # one list of step losses per epoch
    val_curve: list  # mean val loss after each epoch (eval mode)
    val_losses: np.ndarray  # per-sample val losses at the end
    val_losses_per_epoch: list
    val_parts: dict  # criterion part name -> per-sample values at the end
    forgetting: list  # per epoch: (losses on the epoch's first quarter right after it, the same at epoch end)
    diverged: bool
    seconds: float
    model: nn.Module = None

    @property
    def val_loss(self):
        return float(np.mean(self.val_losses)) if len(self.val_losses) else math.inf

    def summary(self):
        return {
            "val_loss": self.val_loss,
            "val_curve": [float(v) for v in self.val_curve],
            "train_loss_first_epoch": float(np.mean(self.epoch_step_losses[0]))
            if self.epoch_step_losses
            else None,
            "train_loss_last_epoch": float(np.mean(self.epoch_step_losses[-1]))
            if self.epoch_step_losses
            else None,
            "diverged": self.diverged,
            "seconds": round(self.seconds, 2),
        }


def train(
    task,
    *,
    items=None,
    val_items=None,
    epochs=None,
    lr=None,
    batch_size=None,
    shuffle=None,
    model_factory=None,
    optimizer_factory=None,
    seed=None,
    track_forgetting=True,
):
    """Train a fresh model from `task` with a constant learning rate; every knob can be overridden.

    `items` (a list, or a function items -> items such as `zero_inputs`) replaces the training items;
    the same function is applied to the validation items, so a control is evaluated like it was trained.
    """
    start = time.perf_counter()
    seed = task.seed if seed is None else seed
    train_items = task.train_items
    val_items = task.val_items if val_items is None else val_items
    if callable(items):
        train_items, val_items = items(train_items), items(val_items)
    elif items is not None:
        train_items = items
    torch.manual_seed(seed)
    model = (model_factory or task.model_factory)().to(task.device)
    lr = task.lr if lr is None else lr
    optimizer = (optimizer_factory or task.optimizer_factory)(model, lr)
    loader = task.loader(train_items, batch_size, shuffle, seed)
    epochs = task.epochs if epochs is None else epochs
    if task.max_steps:
        epochs = max(1, min(epochs, task.max_steps // max(1, len(loader))))
    steps, per_epoch, val_curve, val_per_epoch, forgetting = [], [], [], [], []
    diverged = False
    for _epoch in range(epochs):
        model.train()
        epoch_losses, seen, quarter = [], [], None
        n_batches = len(loader)
        for b, batch in enumerate(loader):
            batch = to_device(batch, task.device)
            loss = loss_value(task.criterion(task.forward(model, batch), batch))
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if task.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
            optimizer.step()
            epoch_losses.append(value)
            if track_forgetting and n_batches >= 4:
                if b < n_batches // 4:
                    seen.extend(unbatch(to_device(batch, "cpu"), task.input_key))
                if b == n_batches // 4 - 1:
                    quarter = per_sample_losses(task, model, seen)
                    model.train()
        steps.extend(epoch_losses)
        per_epoch.append(epoch_losses)
        if diverged:
            break
        if quarter is not None:
            forgetting.append((quarter, per_sample_losses(task, model, seen)))
        val_parts = {}
        losses = per_sample_losses(task, model, val_items, parts=val_parts)
        val_per_epoch.append(losses)
        val_curve.append(float(np.mean(losses)))
        if not np.all(np.isfinite(losses)):
            diverged = True
            break
    if val_per_epoch and not diverged:
        final, parts = val_per_epoch[-1], {k: np.asarray(v) for k, v in val_parts.items()}
    else:
        final, parts = np.full(len(val_items), np.inf), {}
    return Run(
        steps,
        per_epoch,
        val_curve,
        final,
        val_per_epoch,
        parts,
        forgetting,
        diverged,
        time.perf_counter() - start,
        model,
    )


# --- symptom measures ----------------------------------------------------------------------------------------


def compare_runs(worse, better, alpha=0.01, min_gain=0.05, parts=True):
    """Is `better` better than `worse` on held-out data, by the total loss or by any criterion part?

    Each metric (the loss, then each part the criterion reports, e.g. the loss's named terms) gets
    a paired one-sided permutation test; Bonferroni over the metrics keeps the family-wise error at `alpha`.
    A metric counts when significant AND at least `min_gain` relative better (significant but tiny gains are
    not "better"). Returns the best metric's name, p-value and gain, and `better`: True/False.
    A total loss that got significantly worse vetoes a part's gain. `parts=False` compares the loss only.
    """
    if better.diverged:
        return {"better": False, "metric": "loss", "p_value": 1.0, "gain": -1.0, "metrics": {}}
    if worse.diverged:
        return {"better": True, "metric": "loss", "p_value": 0.0, "gain": 1.0, "metrics": {}}
    metrics = {"loss": (worse.val_losses, better.val_losses)}
    for name, values in better.val_parts.items() if parts else ():
        if name in worse.val_parts and len(values) == len(worse.val_parts[name]):
            metrics[name] = (worse.val_parts[name], values)
    level = alpha / len(metrics)
    results = {name: paired_test(a, b) for name, (a, b) in metrics.items()}
    total_worse = paired_test(better.val_losses, worse.val_losses)
    veto = total_worse[0] < alpha and total_worse[1] > min_gain
    hits = {k: v for k, v in results.items() if v[0] < level and v[1] >= min_gain}
    name = max(hits, key=lambda k: hits[k][1]) if hits and not veto else "loss"
    p, gain = results[name]
    return {
        "better": bool(hits) and not veto,
        "metric": name,
        "p_value": p,
        "gain": gain,
        "metrics": {k: {"p_value": v[0], "gain": v[1]} for k, v in results.items()},
    }


def learning_vs_control(run, control, alpha=0.01, min_gain=0.05):
    """Does the model beat a control (input-independent or shuffled-target) on held-out data?

    learned = compare_runs finds the model better than the control at `alpha` by at least `min_gain`
    relative, on the loss or on one of the criterion's parts.
    """
    r = compare_runs(control, run, alpha, min_gain)
    return {
        "learned": r["better"],
        "metric": r["metric"],
        "p_value": r["p_value"],
        "gain_vs_control": r["gain"],
        "val_loss": run.val_loss,
        "control_val_loss": control.val_loss,
        "metrics": r["metrics"],
    }


def bounce_statistics(run, alpha=0.01):
    """Loss bounces: epochs whose mean training loss is significantly ABOVE the best earlier epoch.

    Welch's z on the per-step losses of the two epochs; with a sane learning rate the epoch-mean training
    loss never rises significantly (overfitting raises the validation loss, not the training loss).
    Divergence (non-finite loss) counts as a bounce.
    """
    z_crit = _z_quantile(1 - alpha)
    rises, worst = 0, 0.0
    best_mean, best = math.inf, None
    for losses in run.epoch_step_losses:
        x = np.asarray(losses, np.float64)
        if len(x) < 2:
            continue
        if best is not None:
            se = math.sqrt(x.var(ddof=1) / len(x) + best.var(ddof=1) / len(best))
            z = (x.mean() - best.mean()) / se if se > 0 else 0.0
            worst = max(worst, z)
            rises += z > z_crit
        if x.mean() < best_mean:
            best_mean, best = x.mean(), x
    val_rises = 0
    for i in range(1, len(run.val_losses_per_epoch)):
        prev = min(range(i), key=lambda j: run.val_curve[j])
        p, rel = paired_test(run.val_losses_per_epoch[i], run.val_losses_per_epoch[prev])
        # a rise of the val loss that is later undone: bouncing, not overfitting
        undone = i + 1 < len(run.val_curve) and min(run.val_curve[i + 1 :]) < run.val_curve[prev]
        val_rises += p < alpha and rel > 0 and undone
    return {
        "train_rises": int(rises),
        "max_rise_z": float(worst),
        "val_rises_undone": int(val_rises),
        "diverged": run.diverged,
    }


def forgetting_statistics(run):
    """Catastrophic forgetting within an epoch: loss on the epoch's first quarter at the end of the epoch
    divided by the same loss right after training on it (median over epochs 2+; epoch 1 is still learning
    everything). Shuffled data: ~1 or below; data presented in blocks: the model tracks the current block
    and the ratio climbs well above 1."""
    ratios, ps = [], []
    for after, end in run.forgetting[1:]:
        if np.mean(after) > 0:
            ratios.append(float(np.mean(end) / np.mean(after)))
            ps.append(paired_test(end, after)[0])
    if not ratios:
        return {"ratio": None, "p_value": None}
    return {"ratio": float(np.median(ratios)), "p_value": float(np.median(ps))}


def _z_quantile(q):
    # inverse normal CDF by bisection on erfc (no scipy)
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --- cause probes: data --------------------------------------------------------------------------------------


def order_test(task, loader=None, n=None):
    """Are targets presented in blocks? A Wald-Wolfowitz runs test and the lag-1 autocorrelation of every
    target component in the order the training loader yields them; the smallest p-value, Bonferroni-corrected
    for the number of components. A shuffled loader gives z ~ N(0, 1); sorted or grouped data gives far too
    few runs (z << 0) in the component it is ordered by."""
    source = loader if loader is not None else task.loader(task.train_items)
    ys = []
    for batch in source:
        ys.append(task.target_fn(batch).float().cpu())
        if n is not None and sum(len(y) for y in ys) >= n:
            break
    y = torch.cat(ys)[:n].numpy().astype(np.float64)
    y = y[:, y.std(0) > 0]
    if y.shape[1] == 0 or len(y) < 4:
        return {
            "runs_z": 0.0,
            "p_value": 1.0,
            "lag1_autocorrelation": 0.0,
            "component": None,
            "n": int(len(y)),
        }
    tests = [runs_test(y[:, k]) for k in range(y.shape[1])]
    k = int(np.argmin([p for _, p in tests]))
    z, p = tests[k]
    s = y[:, k]
    lag1 = float(np.corrcoef(s[:-1], s[1:])[0, 1]) if len(s) > 2 else 0.0
    return {
        "runs_z": z,
        "p_value": min(1.0, p * y.shape[1]),
        "lag1_autocorrelation": lag1,
        "component": k,
        "n": int(len(y)),
    }


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


def shortcut_probe(task, max_features=4096):
    """Can a trivial model predict the target? Two trivial models, fitted on the training items and scored
    by R^2 on the validation items:

    - single input value: the best one-variable linear fit of each target component on ONE pixel
      (a leaked answer sits in a few pixels; real content never pins a target on one pixel),
    - input statistics: least squares on per-channel mean and std of each input.
    """

    def features(items):
        x = torch.stack([torch.as_tensor(get_input(it, task.input_key)).float() for it in items])
        flat = x.reshape(len(x), -1)
        if flat.shape[1] > max_features:  # evenly spaced subset keeps the probe cheap on big inputs
            flat = flat[:, torch.linspace(0, flat.shape[1] - 1, max_features).long()]
        chans = x.reshape(len(x), x.shape[1], -1) if x.ndim > 2 else x.reshape(len(x), 1, -1)
        stats = torch.cat([chans.mean(-1), chans.std(-1)], 1)
        return flat.numpy().astype(np.float64), stats.numpy().astype(np.float64)

    def targets(items):
        return task.target_fn(collate(items)).numpy().astype(np.float64)

    xtr, str_ = features(task.train_items)
    xva, sva = features(task.val_items)
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
    # input statistics: ordinary least squares with a small ridge for conditioning
    A = np.c_[str_, np.ones(len(str_))]
    w = np.linalg.solve(A.T @ A + 1e-6 * np.eye(A.shape[1]), A.T @ ytr)
    r2_stats = 1 - ((np.c_[sva, np.ones(len(sva))] @ w - yva) ** 2).sum(0) / np.maximum(sst, 1e-12)
    return {
        "best_single_value_r2": float(r2_pixel.max()) if r2_pixel.size else 0.0,
        "best_single_value_index": pixel_index,
        "best_single_value_target": int(np.flatnonzero(keep)[best[1]]) if r2_pixel.size else -1,
        "input_statistics_r2": float(r2_stats.max()) if r2_stats.size else 0.0,
    }


def input_statistics(task, n=256):
    """Mean and std of the inputs, per channel: far from (0, 1) is an unnormalized input."""
    x = torch.stack([torch.as_tensor(get_input(it, task.input_key)).float() for it in task.train_items[:n]])
    dims = [0] + list(range(2, x.ndim))
    mean = x.mean(dims) if x.ndim > 2 else x.mean(0)
    std = x.std(dims) if x.ndim > 2 else x.std(0)
    return {
        "channel_mean": [float(v) for v in mean.flatten()[:16]],
        "channel_std": [float(v) for v in std.flatten()[:16]],
        "max_abs_mean": float(mean.abs().max()),
        "min_std": float(std.min()),
        "max_std": float(std.max()),
        "mean": mean,
        "std": std,
    }


def test_set_precision(val_losses, n_total, target_rel_half_width=0.1, seed=0):
    """How precisely does a test set of `n_total` samples measure the mean loss? The 95% bootstrap CI half
    width of the mean, from the per-sample losses on hand, rescaled by sqrt(n_sample / n_total); and the
    test-set size that would give `target_rel_half_width`."""
    mean, low, high = bootstrap_ci(val_losses, seed=seed)
    half = (high - low) / 2 * math.sqrt(len(val_losses) / max(1, n_total))
    rel = half / abs(mean) if mean else math.inf
    needed = int(math.ceil(n_total * (rel / target_rel_half_width) ** 2)) if math.isfinite(rel) else None
    return {
        "n_test": int(n_total),
        "mean": mean,
        "ci95_half_width": half,
        "relative_half_width": rel,
        "n_needed": needed,
    }


# --- cause probes: model -------------------------------------------------------------------------------------


def batch_dependency(model, batch, forward=None, input_key="image", train_mode=False):
    """Backprop-dependency check (Karpathy): the gradient of sample i's output w.r.t. input j != i must be
    zero, otherwise the model mixes information across the batch (a view/reshape bug, or BatchNorm in train
    mode). Also returns the gradient w.r.t. input i itself: zero means the model ignores its input.
    """
    forward = forward or (lambda m, b: m(get_input(b, input_key)))
    model.train(train_mode)
    x = get_input(batch, input_key).detach().clone().float().requires_grad_(True)
    out = forward(model, set_input(batch, x, input_key))
    outputs = [
        o
        for o in (out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else [out])
        if torch.is_tensor(o)
    ]
    i = 0
    scalar = sum(o[i].float().sum() for o in outputs)
    (grad,) = torch.autograd.grad(scalar, x, allow_unused=True)
    model.eval()
    if grad is None:
        return {"own_gradient": 0.0, "other_gradient": 0.0, "ratio": 0.0}
    per_sample = grad.reshape(len(grad), -1).abs().sum(1)
    own = float(per_sample[i])
    other = float(per_sample[1:].max()) if len(per_sample) > 1 else 0.0
    return {
        "own_gradient": own,
        "other_gradient": other,
        "ratio": other / own if own > 0 else math.inf if other else 0.0,
    }


def he_initialized(model):
    """A copy of `model` with He-normal (fan-in, ReLU gain) conv/linear weights and zero biases."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def init_statistics(model, batch, criterion, forward=None, input_key="image"):
    """Loss at initialization and per-layer forward/backward statistics (train mode, one batch).

    For each Conv/Linear layer: std of its output activations, norm of its weight gradient relative to the
    weight norm, and its weight std divided by He-normal's sqrt(2 / fan_in) (Kaiming He et al. 2015; for a
    ReLU network a ratio far below 1 shrinks the signal layer by layer, far above 1 blows it up).
    """
    forward = forward or (lambda m, b: m(get_input(b, input_key)))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.Conv1d)]
    acts = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=n: acts.__setitem__(name, float(out.detach().float().std()))
        )
        for n, m in layers
    ]
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        loss = loss_value(criterion(forward(model, batch), batch))
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in layers:
        w = m.weight
        fan_in = w[0].numel()
        grad = float(w.grad.norm()) if w.grad is not None else 0.0
        rows.append(
            {
                "layer": name,
                "activation_std": acts.get(name, float("nan")),
                "weight_std_over_he": float(w.detach().std()) / math.sqrt(2.0 / fan_in),
                "grad_over_weight": grad / max(float(w.detach().norm()), 1e-12),
            }
        )
    model.zero_grad(set_to_none=True)
    return {"loss_at_init": float(loss.detach()), "layers": rows}


def overfit_subset(task, n=8, steps=200, lr=None, required_drop=0.9):
    """Karpathy's "overfit one batch": train on `n` fixed samples for `steps` steps (no shuffling).

    Pass = the loss falls by at least `required_drop` (default 90%) of its initial value. Any working model
    and loss memorizes a handful of samples; failing this points at the code, not at the data.
    """
    items = task.train_items[:n]
    torch.manual_seed(task.seed)
    model = task.model_factory().to(task.device)
    optimizer = task.optimizer_factory(model, task.lr if lr is None else lr)
    batch = to_device(collate(items), task.device)
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_value(task.criterion(task.forward(model, batch), batch))
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = float(np.mean(per_sample_losses(task, model, items)))
    initial = losses[0]
    drop = 1 - final / initial if initial > 0 and math.isfinite(final) else 0.0
    return {
        "passed": bool(drop >= required_drop),
        "initial_loss": initial,
        "final_loss": final,
        "drop": float(drop),
        "required_drop": required_drop,
        "n": n,
        "steps": steps,
        "curve": losses,
    }


def lr_range_test(
    task, lr_min=1e-7, lr_max=10.0, steps=100, batch_size=None, seed=None, diverge_factor=4.0, beta=0.9
):
    """Leslie Smith's LR range test (2017, as in fastai's lr_find): raise the LR exponentially each step
    and record the (exponentially smoothed, bias-corrected) loss until it exceeds `diverge_factor` x its best.

    Suggestion = the LR at the minimum of the smoothed loss divided by 10 (Smith's and fastai's rule: the
    best loss is reached just before the LR is too high). `lr_valley` is the LR at the minimum itself.
    """
    seed = task.seed if seed is None else seed
    torch.manual_seed(seed)
    model = task.model_factory().to(task.device)
    optimizer = task.optimizer_factory(model, lr_min)
    loader = task.loader(task.train_items, batch_size, True, seed)
    factor = (lr_max / lr_min) ** (1 / (steps - 1))
    lrs, smoothed, avg, best = [], [], 0.0, math.inf
    it = iter(loader)
    model.train()
    for step in range(steps):
        lr = lr_min * factor**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = to_device(batch, task.device)
        loss = loss_value(task.criterion(task.forward(model, batch), batch))
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        avg = beta * avg + (1 - beta) * value
        s = avg / (1 - beta ** (step + 1))
        lrs.append(lr)
        smoothed.append(s)
        best = min(best, s)
        if s > diverge_factor * best and step > 5:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if not smoothed:
        return {"lr_valley": lr_min, "suggestion": lr_min, "lrs": [], "losses": [], "diverged_at": lr_min}
    i = int(np.argmin(smoothed))
    diverged_at = lrs[-1] if smoothed[-1] > diverge_factor * best else None
    return {
        "lr_valley": float(lrs[i]),
        "suggestion": float(lrs[i] / 10),
        "diverged_at": diverged_at,
        "lrs": [float(v) for v in lrs],
        "losses": [float(v) for v in smoothed],
    }


def gradient_noise_scale(task, model=None, small=None, big=None, repeats=8, seed=0):
    """McCandlish et al. (2018) simple noise scale B_simple = tr(Sigma) / |G|^2, from gradient norms at two
    batch sizes: E|g_B|^2 = |G|^2 + tr(Sigma)/B. Training at B << B_simple is noise-dominated: each step's
    gradient is mostly noise. Returns B_simple and the signal-to-noise ratio at the configured batch size.
    """
    small = small or task.batch_size
    big = big or min(len(task.train_items), max(4 * small, 64))
    model = model or task.model_factory().to(task.device)
    model.train()
    rng = np.random.default_rng(seed)

    def grad_sq(b):
        norms = []
        for _ in range(repeats):
            idx = rng.choice(len(task.train_items), size=b, replace=False)
            batch = to_device(collate([task.train_items[i] for i in idx]), task.device)
            model.zero_grad(set_to_none=True)
            loss_value(task.criterion(task.forward(model, batch), batch)).backward()
            norms.append(sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None))
        return float(np.mean(norms))

    g_small, g_big = grad_sq(small), grad_sq(big)
    model.zero_grad(set_to_none=True)
    if big == small:
        return {"b_simple": None, "small": small, "big": big}
    g2 = (big * g_big - small * g_small) / (big - small)
    tr_sigma = (g_small - g_big) / (1 / small - 1 / big)
    b_simple = tr_sigma / g2 if g2 > 0 else math.inf
    return {
        "b_simple": float(b_simple),
        "grad_sq_true": float(g2),
        "trace_sigma": float(tr_sigma),
        "small": small,
        "big": big,
        "noise_to_signal_at_batch": float(b_simple / task.batch_size),
    }


class Standardize(nn.Module):
    """Wraps a model so it sees standardized inputs (per-channel mean/std): the input-feature probe's fix."""

    def __init__(self, model, mean, std, input_ndim=4):
        super().__init__()
        self.model = model
        shape = (1, -1) + (1,) * (input_ndim - 2)
        self.register_buffer("input_mean", torch.as_tensor(mean).float().reshape(shape))
        self.register_buffer("input_std", torch.as_tensor(std).float().clamp_min(1e-6).reshape(shape))

    def forward(self, x):
        return self.model((x - self.input_mean) / self.input_std)
