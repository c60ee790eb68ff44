"""The doctor's training runs: a `Task` (what to train, on which items, with which knobs) and `train`, which
trains it through the project's own training step (`training.run_epoch` / `training.train_step`, the code
`make train` runs), so a bug in that step breaks the doctor's runs too.

    task = Task(model_factory=lambda: MyNet(), criterion=lambda out, batch: F.mse_loss(out, batch[1]),
                train_items=take_items(train_loader, 256), val_items=take_items(val_loader, 128))
    run = train(task)                                   # short training: loss curves, per-sample val losses
    control = train(task, items=zero_inputs)            # Karpathy's input-independent baseline

Conventions: an *item* is one sample as a dataset returns it: a tuple/list `(input, target, ...)` or a
dict (`input_key` names the input, default "image"). `criterion(out, batch)` returns a scalar loss or
`(loss, parts)`. `optimizer_factory(model, lr)` returns an optimizer. Items are kept in memory: the doctor
trains on a few hundred samples, which is the point of a cheap diagnosis.
"""

import dataclasses
import math
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import training
from ..batches import collate, to_device

# --- items and batches ---------------------------------------------------------------------------------------


def batch_size_of(batch, input_key="image"):
    return len(get_input(batch, input_key))


def get_input(batch, input_key="image"):
    if isinstance(batch, dict):
        if input_key not in batch:
            raise KeyError(f"runs: batch has no input key '{input_key}' (keys: {sorted(batch)})")
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
            raise KeyError("runs: dict batches need a target_fn (no 'target' key)")
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
        collated = not any(torch.is_tensor(v) or isinstance(v, np.ndarray | dict | list | tuple) for v in obj)
        if len(obj) == n and not isinstance(obj, tuple) and collated:  # a collated list of strings / numbers
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
    # ... but a run keeps at least this many epochs (the fewer training items per epoch): a tiny batch that
    # would need all its steps for one epoch still shows how its loss moves from epoch to epoch
    min_epochs: int = 1
    grad_clip: float | None = None
    amp: str | None = (
        None  # autocast device type of the training step (training.step_settings), None = float32
    )
    memory_format: object = None  # the input's memory format in the training step (channels_last or None)
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


def grad_scaler(task):
    """The loss scaler the training step needs: float16 autocast (CUDA) only, as in `training.build`;
    bfloat16 has float32's exponent range."""
    return torch.amp.GradScaler("cuda") if task.amp == "cuda" else None


@torch.no_grad()
def per_sample_losses(task, model, items, batch_size=64, parts=None):
    """Eval-mode loss of every item: the criterion applied to one-sample slices of a batched forward, or, when
    the criterion offers `per_sample(out, batch) -> (losses [B], {name: [B]})`, the same values in one call
    per batch (checked against the criterion's batch loss: their mean must be it).

    With a dict `parts`, the criterion's scalar parts (when it returns `(loss, parts)`) are appended to
    parts[name], one value per item: the probes treat every part as lower-is-better (errors, loss terms).
    """
    model.eval()
    losses = []
    per_sample = getattr(task.criterion, "per_sample", None)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = to_device(collate(chunk), task.device)
        out = task.forward(model, batch)
        if per_sample is not None:
            values, named = _per_sample_call(task.criterion, out, batch, len(chunk))
            losses.extend(values)
            for name, column in named.items() if parts is not None else ():
                parts.setdefault(name, []).extend(column)
            continue
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


def _per_sample_call(criterion, out, batch, n):
    """criterion.per_sample on a batch of n, as lists of floats: (losses, {part name: values})."""
    values, named = criterion.per_sample(out, batch)
    values = torch.as_tensor(values).detach().float().reshape(-1)
    batch_loss = float(loss_value(criterion(out, batch)))
    if len(values) != n or not math.isclose(float(values.mean()), batch_loss, rel_tol=1e-4, abs_tol=1e-6):
        raise ValueError(
            f"criterion.per_sample returned {len(values)} losses with mean {float(values.mean()):.6g} for a batch "
            f"of {n} whose loss is {batch_loss:.6g}: it must return the criterion's loss of each sample"
        )
    columns = {}
    for name, value in dict(named).items():
        value = torch.as_tensor(value).detach().float().reshape(-1)
        if name != "loss" and len(value) == n:
            columns[name] = value.tolist()
    return values.tolist(), columns


# --- training runs --------------------------------------------------------------------------------------------


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
    """Train a fresh model from `task` with a constant learning rate through the project's training step
    (`training.run_epoch`); every knob can be overridden.

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
    epochs = task.epochs if epochs is None else epochs
    loader = task.loader(train_items, batch_size, shuffle, seed)
    if task.max_steps:
        keep = min(epochs, task.min_epochs)
        if len(loader) * keep > task.max_steps:  # sized in epochs and steps: fewer items per epoch
            per_epoch = max(1, task.max_steps // keep) * loader.batch_size
            loader = task.loader(train_items[:per_epoch], batch_size, shuffle, seed)
        epochs = max(1, min(epochs, task.max_steps // max(1, len(loader))))
    scaler = grad_scaler(task)
    steps, per_epoch, val_curve, val_per_epoch, forgetting = [], [], [], [], []
    diverged = False
    for _epoch in range(epochs):
        epoch_losses, seen, quarter = [], [], None
        n_batches = len(loader)
        epoch = training.run_epoch(
            model,
            loader,
            task.criterion,
            optimizer,
            device=task.device,
            memory_format=task.memory_format,
            input_key=task.input_key,
            grad_clip=task.grad_clip,
            amp=task.amp,
            scaler=scaler,
        )
        for b, batch, value, _ in epoch:
            if not math.isfinite(value):
                diverged = True
                break
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
