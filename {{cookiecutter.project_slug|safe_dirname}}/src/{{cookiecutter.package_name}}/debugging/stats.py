"""The doctor's statistics: paired sign-flip and two-sample permutation tests, permutation tests for trends,
percentile bootstrap CIs, the Wald-Wolfowitz runs test (normal approx.), and the symptom measures built on them
(did a run learn, beat another, bounce, forget?). Written with numpy on purpose: no scipy dependency.

The symptom measures take `runs.Run`s: per-sample validation losses, per-epoch step losses.
"""

import math

import numpy as np

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


def two_sample_test(a, b, n_perm=10000, seed=0):
    """One-sided permutation test of mean(a) > mean(b) for two independent samples (losses of different
    items). Returns (p_value, ratio mean(a) / mean(b)). Exact under the null that the pooled values are
    exchangeable; no normality assumption."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return 1.0, math.nan
    pooled, k = np.concatenate([a, b]), len(a)
    observed = a.mean() - b.mean()
    rng, exceed, chunk = np.random.default_rng(seed), 0, max(1, 2_000_000 // len(pooled))
    for start in range(0, n_perm, chunk):
        shuffled = rng.permuted(np.tile(pooled, (min(chunk, n_perm - start), 1)), axis=1)
        null = shuffled[:, :k].mean(axis=1) - shuffled[:, k:].mean(axis=1)
        exceed += int(np.sum(null >= observed - 1e-12))
    ratio = float(a.mean() / b.mean()) if b.mean() != 0 else math.inf
    return float((1 + exceed) / (n_perm + 1)), ratio


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


# --- symptom measures ----------------------------------------------------------------------------------------


def compare_runs(worse, better, alpha=0.01, min_gain=0.05, parts=True):
    """Is `better` better than `worse` on held-out data, by the total loss or by any criterion part?

    Each metric (the loss, then each part the criterion reports, e.g. the loss's named terms) gets
    a paired one-sided permutation test; Bonferroni over the metrics keeps the family-wise error at `alpha`.
    A metric counts when significant AND at least `min_gain` relative better (significant but tiny gains are
    not "better"). Returns the best metric's name, p-value and gain, `better`: True/False, and
    `total_worse`: the total loss got significantly and clearly worse, which vetoes a part's gain.
    `parts=False` compares the loss only.
    """
    if better.diverged or worse.diverged:  # a diverged run is worse than any finite one
        ok = not better.diverged
        return {"better": ok, "total_worse": not ok, "metric": "loss", "p_value": 0.0 if ok else 1.0,
                "gain": 1.0 if ok else -1.0, "metrics": {}}  # fmt: skip
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
        "total_worse": bool(veto),
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


def terms_not_learning(learning, alpha=0.01, min_gain=0.05):
    """The criterion's named parts (loss terms, metrics) that do not beat the control, from a
    `learning_vs_control` result: each part on its own, at the Bonferroni level compare_runs uses. A part of
    the output that stays at the control's level while the rest learns is its own "won't go above random"."""
    metrics = learning["metrics"]
    level = alpha / max(1, len(metrics))
    return sorted(
        k for k, v in metrics.items() if k != "loss" and not (v["p_value"] < level and v["gain"] >= min_gain)
    )


def bounce_statistics(run, alpha=0.01):
    """Loss bounces: epochs whose mean training loss is significantly ABOVE the best earlier epoch.

    Welch's z on the per-step losses of the two epochs; with a sane learning rate the epoch-mean training
    loss never rises significantly (overfitting raises the validation loss, not the training loss).
    Divergence (non-finite loss) counts as a bounce.
    """
    rises = epoch_rises([epoch_summary(losses) for losses in run.epoch_step_losses], alpha)
    val_rises = 0
    for i in range(1, len(run.val_losses_per_epoch)):
        prev = min(range(i), key=lambda j: run.val_curve[j])
        p, rel = paired_test(run.val_losses_per_epoch[i], run.val_losses_per_epoch[prev])
        # a rise of the val loss that is later undone: bouncing, not overfitting
        undone = i + 1 < len(run.val_curve) and min(run.val_curve[i + 1 :]) < run.val_curve[prev]
        val_rises += p < alpha and rel > 0 and undone
    return {
        "train_rises": rises["rises"],
        "max_rise_z": rises["max_rise_z"],
        "val_rises_undone": int(val_rises),
        "diverged": run.diverged,
    }


def epoch_summary(losses):
    """(mean, variance, count) of one epoch's step losses: all that the epoch-level tests below need, and what
    `make train` keeps in its history (`train/loss_epoch`, `train/loss_epoch_var`, `train/loss_epoch_steps`)."""
    x = np.asarray(losses, np.float64)
    return float(x.mean()) if len(x) else math.nan, float(x.var(ddof=1)) if len(x) > 1 else math.nan, len(x)


def welch_z(a, b):
    """Welch's z of mean(a) - mean(b) for two epochs given as (mean, variance, count); 0 when both are exact."""
    se = math.sqrt(a[1] / a[2] + b[1] / b[2])
    return (a[0] - b[0]) / se if se > 0 else 0.0


def epoch_rises(epochs, alpha=0.01):
    """The training-loss half of `bounce_statistics` on epoch summaries (`epoch_summary`): epochs whose mean
    step loss is significantly above the best earlier epoch's (Welch z > the one-sided normal quantile at
    `alpha`; epochs of fewer than 2 steps are skipped). Returns the count, the largest z and, for that rise,
    its epoch and the best earlier epoch (1-based) with their means."""
    z_crit = z_quantile(1 - alpha)
    rises, worst, where = 0, 0.0, None
    best = None  # (index, summary) of the lowest mean so far
    for i, e in enumerate(epochs):
        if e[2] < 2:
            continue
        if best is not None:
            z = welch_z(e, best[1])
            if z > worst:
                worst, where = z, (i, best[0])
            rises += z > z_crit
        if best is None or e[0] < best[1][0]:
            best = (i, e)
    out = {"rises": int(rises), "max_rise_z": float(worst), "z_critical": z_crit}
    if where is not None:
        i, j = where
        out |= {"epoch": i + 1, "mean": epochs[i][0], "best_epoch": j + 1, "best_mean": epochs[j][0]}
    return out


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


def z_quantile(q):
    # inverse normal CDF by bisection on erfc (no scipy)
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
