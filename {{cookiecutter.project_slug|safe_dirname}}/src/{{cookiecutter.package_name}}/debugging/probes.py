"""Failure-mode probes: the data and model checks of the talk's "Failure Modes in Deep Learning" table,
one function per diagnostic, usable on any PyTorch model and data (a `runs.Task`):

    order_test(task, loader)                            # are targets presented in blocks?
    batch_dependency(task.model_factory(), batch)       # does output i depend on input j != i (eval mode)?
    overfit_subset(task)                                # can it memorize 8 samples (Karpathy)?
    lr_range_test(task)                                 # LR range test (Smith 2017) with a suggestion

The leak checks (train/val duplicates, shortcuts) are in `leaks.py`. The training probes (overfit test, LR
range test) step through the project's training step (`training.train_step`), like every run of the doctor
(`runs.train`).
"""

import copy
import math
import random

import numpy as np
import torch
from torch import nn

from .. import training
from ..batches import collate, to_device
from .runs import get_input, grad_scaler, loss_value, per_sample_losses, set_input
from .stats import bootstrap_ci, runs_test

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


def named_outputs(out):
    """A model's output as {name: tensor}: a dict's tensors by key, a list's or tuple's by index, else "output"."""
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, list | tuple):
        items = enumerate(out)
    else:
        items = [("output", out)]
    return {name: o for name, o in items if torch.is_tensor(o)}


def batch_dependency(model, batch, forward=None, input_key="image", train_mode=False):
    """Backprop-dependency check (Karpathy): the gradient of sample i's output w.r.t. input j != i must be
    zero, otherwise the model mixes information across the batch (a view/reshape bug, or BatchNorm in train
    mode). Also returns the gradient w.r.t. input i itself: zero means the model ignores its input.
    """
    forward = forward or (lambda m, b: m(get_input(b, input_key)))
    model.train(train_mode)
    x = get_input(batch, input_key).detach().clone().float().requires_grad_(True)
    out = forward(model, set_input(batch, x, input_key))
    i = 0
    scalar = sum(o[i].float().sum() for o in named_outputs(out).values())
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
    `without_gradient`: the trainable parameters the loss does not reach at all (no gradient, not a zero one):
    the part of the network they compute never trains (a detached or missing loss term, an unused head).
    `frozen`: the parameters with `requires_grad=False`, which no loss can train (a freeze for fine-tuning,
    intended or left over).
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
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    without = [n for n, p in trainable if p.grad is None]
    model.zero_grad(set_to_none=True)
    return {
        "loss_at_init": float(loss.detach()),
        "layers": rows,
        "n_trainable": len(trainable),
        "without_gradient": without,
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def dead_outputs(model, batch, forward=None, input_key="image"):
    """The output components that no trainable parameter can move on `batch` (eval mode, float32): the
    gradient of the component, summed over the batch, w.r.t. every trainable parameter is exactly zero.

    A network's output layer always passes gradient to its own weights and bias, so a component cut off
    from all of them has something flat or detached after that layer: a ReLU or clamp whose input went
    out of range on every sample, a `round`, a `.detach()`. Nothing can train it, whatever the loss says.
    Run on the trained model (a ReLU output dies during training, not at initialization).
    """
    forward = forward or (lambda m, b: m(get_input(b, input_key)))
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    with torch.enable_grad():
        out = forward(model, batch)
    dead, n = [], 0
    for name, o in named_outputs(out).items():
        if not o.is_floating_point():
            continue
        flat = o.reshape(len(o), -1)
        for c in range(flat.shape[1]):
            n += 1
            if not flat.requires_grad or not params:
                dead.append(f"{name}[{c}]")
                continue
            grads = torch.autograd.grad(flat[:, c].sum(), params, retain_graph=True, allow_unused=True)
            if sum(float(g.abs().sum()) for g in grads if g is not None) == 0.0:  # NaN (diverged) is not zero
                dead.append(f"{name}[{c}]")
    return {"n_components": n, "n_samples": len(get_input(batch, input_key)), "dead": dead}


def augmentation_agreement(draw, augment, batch, input_key="image", seed=0):
    """Does an augmentation change the labels as it changes the images? The labels drawn as inputs
    (Task.draw_labels), that drawing put through the augmentation in place of the images, against a drawing
    of the labels the augmentation returns: the Pearson correlation of the two per sample (1: they agree; a
    right label update leaves only the warp's interpolation). Only pixels whose source lies inside the frame
    are compared (an all-ones image put through the same augmentation, kept where it stays at its maximum):
    a label drawn partly off the frame (a truncated object, a near one) is drawn in full from the returned
    labels but cut in the warped drawing, and a warp that brings that part in is no disagreement. A sample
    with nothing drawn on either side there is not compared. None when the task draws no labels (or none
    inside the frame). The augmentation's random draws come from generators seeded here and restored
    afterwards (each of the two passes draws the same numbers), so the doctor's runs draw what they would
    without this check."""
    drawn = draw(batch)
    if drawn is None:
        return None
    states = random.getstate(), np.random.get_state()

    def augmented(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            return augment(batch | {input_key: images})

    try:
        out = augmented(drawn)
        ones = augmented(torch.ones_like(drawn))[input_key].flatten(2).double().amin(1)  # [B, HW]
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    inside = (ones >= 0.999 * ones.amax(1, keepdim=True)).double()
    mask = inside.repeat(1, drawn.shape[1])  # the flattened [B, C*H*W] drawings are channel-major
    warped, redrawn = (x.flatten(1).double() for x in (out[input_key], draw(out)))
    n = mask.sum(1, keepdim=True).clamp_min(1)
    warped, redrawn = (mask * (x - (mask * x).sum(1, keepdim=True) / n) for x in (warped, redrawn))
    norms = torch.stack([warped.norm(dim=1), redrawn.norm(dim=1)])
    varies = norms > 1e-6 * norms.max()  # a side that does not vary inside the frame drew nothing there
    corr = torch.where(varies.all(0), (warped * redrawn).sum(1) / norms.prod(0).clamp_min(1e-300), 0.0)
    drawn_any = varies.any(0)  # nothing drawn on either side: nothing to compare
    corr = corr[drawn_any]
    if len(corr) == 0:
        return None
    q = torch.quantile(corr, torch.tensor([0.0, 0.1, 0.5], dtype=corr.dtype)).tolist()
    return {"n_samples": len(corr), "n_drawn_off_frame": int((~drawn_any).sum()),
            "inside_share_median": float(inside.mean(1).median()), "correlation_min": q[0],
            "correlation_p10": q[1], "correlation_median": q[2],
            "correlations": [round(c, 4) for c in corr.tolist()]}  # fmt: skip


def output_span(model, batch, forward=None, input_key="image", tol=1e-4):
    """How many dimensions the model's outputs span on `batch` (eval mode, float32): every output component
    flattened side by side, each sample a row; the components that vary over the batch; the rank of their
    centred matrix (singular values above `tol` x the largest; float32 round-off leaves ~1e-6).

    Components computed by linear layers from one hidden layer of k units span at most k dimensions, however
    they are trained: a layer narrower than the output caps what the model can fit (a bottleneck). A healthy
    network's outputs span every component they have. Components that do not vary at all (an output clamped
    flat) are left out: dead_outputs names those."""
    forward = forward or (lambda m, b: m(get_input(b, input_key)))
    model.eval()
    with torch.no_grad():
        out = forward(model, batch)
    columns = [
        o.detach().double().reshape(len(o), -1) for o in named_outputs(out).values() if o.is_floating_point()
    ]
    if not columns:
        return {"n_components": 0, "varying": 0, "span": 0, "n_samples": 0, "relative_singular_values": []}
    x = torch.cat(columns, 1)
    x = x - x.mean(0)
    scale = x.norm(dim=0)
    varying = (
        x[:, scale > tol * float(scale.max())]
        if float(scale.max()) > 0 and scale.isfinite().all()
        else x[:, :0]
    )
    s = torch.linalg.svdvals(varying) if varying.shape[1] else torch.zeros(0, dtype=x.dtype)
    relative = (s / s[0]).tolist() if len(s) and s[0] > 0 else []
    return {
        "n_components": x.shape[1],
        "varying": varying.shape[1],
        "span": sum(r > tol for r in relative),
        "n_samples": len(x),
        "relative_singular_values": relative,
    }


def _step(task, model, batch, optimizer, scaler):
    """The project's training step (looked up at call time, so what breaks it breaks the probes)."""
    return training.train_step(
        model, batch, task.criterion, optimizer, input_key=task.input_key, amp=task.amp, scaler=scaler
    )


def overfit_subset(task, n=8, steps=200, lr=None, required_drop=0.9, items=None):
    """Karpathy's "overfit one batch": train on `n` fixed samples for `steps` steps (no shuffling).

    Pass = the loss falls by at least `required_drop` (default 90%) of its initial value. Any working model
    and loss memorizes a handful of samples; failing this points at the code, not at the data. `items`
    replaces the first `n` training items (the input-independent control passes them with zeroed inputs);
    `final_parts` holds the criterion's named parts on them at the end (mean per part).
    """
    items = task.train_items[:n] if items is None else items
    torch.manual_seed(task.seed)
    model = task.model_factory().to(task.device)
    optimizer = task.optimizer_factory(model, task.lr if lr is None else lr)
    batch = to_device(collate(items), task.device, task.memory_format, task.input_key)
    losses, scaler = [], grad_scaler(task)
    model.train()
    for _ in range(steps):
        value, _ = _step(task, model, batch, optimizer, scaler)
        losses.append(value)
        if not math.isfinite(value):
            break
    parts = {}
    final = float(np.mean(per_sample_losses(task, model, items, parts=parts)))
    initial = losses[0]
    drop = 1 - final / initial if initial > 0 and math.isfinite(final) else 0.0
    return {
        "passed": bool(drop >= required_drop),
        "initial_loss": initial,
        "final_loss": final,
        "final_parts": {name: float(np.mean(values)) for name, values in parts.items()},
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
    it, scaler = iter(loader), grad_scaler(task)
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
        batch = to_device(batch, task.device, task.memory_format, task.input_key)
        value, _ = _step(task, model, batch, optimizer, scaler)  # the loss before this step's update
        if not math.isfinite(value):
            break
        avg = beta * avg + (1 - beta) * value
        s = avg / (1 - beta ** (step + 1))
        lrs.append(lr)
        smoothed.append(s)
        best = min(best, s)
        if s > diverge_factor * best and step > 5:
            break
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
    small = min(small or task.batch_size, len(task.train_items))  # fewer items than a batch: one batch
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
