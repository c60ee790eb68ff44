"""Stage 3: train the configured task's network (task.Task, selected by `task._target_`). Plain PyTorch,
read it top to bottom.

    python -m <package>.training                              # the default config (CPU)
    python -m <package>.training experiment=<name>            # an experiment (configs/experiment/<name>.yaml)
    python -m <package>.training training.resume=true         # continue exactly where the last run stopped
    python -m torch.distributed.run --nproc_per_node 2 -m <package>.training   # DDP (gloo on CPU, nccl on GPU)

Writes `3_training/checkpoints/last.pt` every epoch (and on SIGTERM, e.g. a SLURM preemption) and
`best.pt` when the validation score improves; both load with `torch.load(path, weights_only=True)`.
`build(cfg)` returns every piece (task, model, data, optimizer, ...), an injected fault included when
`debugging.fault` is set (Task.fault_*), so the doctor and the benchmark reuse exactly what training uses;
`checkpoints.load_model(path)` gives back the task's ready inference model.
"""

import dataclasses
import importlib
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import batches, tracking
from .checkpoints import checkpoint_dir, load_checkpoint, pick_device
from .debugging import stats, symptom_scan
from .files import atomic_path
from .loaders import build_loaders, start_epoch
from .paths import CONFIG_DIR
from .task import load_task

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")


class TrainingDiverged(RuntimeError):
    pass


# --- distributed -------------------------------------------------------------------------------------------


def init_distributed(cfg):
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = cfg.training.get("backend") or ("nccl" if pick_device(cfg).type == "cuda" else "gloo")
    dist.init_process_group(backend)
    return dist.get_rank(), world_size


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# --- reproducibility ---------------------------------------------------------------------------------------


def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state():
    """Every RNG a training step touches, as tensors and plain Python so weights_only loading accepts it."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


# --- building blocks -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    cfg: object
    task: object  # task.Task
    device: torch.device
    model: nn.Module
    criterion: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    train_set: object
    val_set: object
    train_loader: DataLoader
    val_loader: DataLoader


def build_optimizer(cfg, model):
    t = cfg.training
    # No weight decay on biases and norm layers (the torchvision reference recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    raise ValueError(f"training.optimizer must be one of {OPTIMIZERS} (got '{t.optimizer}')")


def build_scheduler(cfg, optimizer, steps_per_epoch):
    t = cfg.training
    total = max(1, t.epochs * steps_per_epoch)
    if t.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=t.lr, total_steps=total, pct_start=t.warmup_fraction, div_factor=t.warmup_div
        )
    if t.schedule == "cosine":
        warmup = max(1, int(t.warmup_fraction * total))
        return torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / t.warmup_div, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total - warmup)),
            ],
            milestones=[warmup],
        )
    if t.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"training.schedule must be one of {SCHEDULES} (got '{t.schedule}')")


def build(cfg):
    """Everything training needs, built from the config; nothing is trained yet."""
    if cfg.training.optimizer not in OPTIMIZERS:  # fail before the (slower) data loading
        raise ValueError(f"training.optimizer must be one of {OPTIMIZERS} (got '{cfg.training.optimizer}')")
    if cfg.training.schedule not in SCHEDULES:
        raise ValueError(f"training.schedule must be one of {SCHEDULES} (got '{cfg.training.schedule}')")
    if cfg.training.get("threads"):
        torch.set_num_threads(cfg.training.threads)
    device = pick_device(cfg)
    seed_everything(cfg.seed, cfg.training.deterministic)
    task = load_task(cfg)
    # an injected fault (`debugging.fault`; none by default), so `make train` with a fault experiment
    # trains on the broken data the doctor diagnoses
    train_set, val_set = task.fault_datasets(cfg, *task.build_datasets(cfg))
    train_loader, val_loader = build_loaders(
        cfg, train_set, val_set, task.train_transform(cfg), task.fault_batch(cfg)
    )
    criterion = task.build_loss(cfg, train_set)
    model = task.fault_model(cfg, task.build_model(cfg)).to(device, memory_format=memory_format(cfg))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    # bfloat16 has float32's exponent range: only float16 (CUDA) needs loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp(cfg, device) and device.type == "cuda")
    return Components(
        cfg=cfg,
        task=task,
        device=device,
        model=model,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_set=train_set,
        val_set=val_set,
        train_loader=train_loader,
        val_loader=val_loader,
    )


def use_amp(cfg, device):
    """Mixed precision: float16 on CUDA (with the gradient scaler); bfloat16 on a CPU with native bf16
    instructions (AVX512-BF16 or AMX: 1.7x the float32 images/s of the default model on the 2-core EPYC
    we benchmark on); otherwise float32."""
    if not cfg.training.amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def cpu_has_native_bf16():
    # torch only exposes these checks privately; when one is missing (or fails) it counts as "no", and
    # without both, stay in float32 (bf16 is emulated and slow)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if callable(check) and check():
                return True
        except Exception:  # a private API may change under us: detection must never stop training
            continue
    return False


def memory_format(cfg):
    # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their faster convolution kernels.
    return torch.channels_last if cfg.training.channels_last else torch.contiguous_format


def to_device(batch, device, cfg):
    return batches.to_device(batch, device, memory_format(cfg))


# --- checkpoints ---------------------------------------------------------------------------------------------


def save_checkpoint(path, c, state):
    """Atomic: a crash while writing leaves the previous checkpoint in place."""
    model = c.model.module if hasattr(c.model, "module") else c.model
    payload = {
        "model": model.state_dict(),
        "optimizer": c.optimizer.state_dict(),
        "scheduler": c.scheduler.state_dict(),
        "scaler": c.scaler.state_dict(),
        "config": OmegaConf.to_container(c.cfg, resolve=True),
        "rng": rng_state(),
        **state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# --- one epoch -----------------------------------------------------------------------------------------------


class StopRequested(Exception):
    pass


def train_step(
    model,
    batch,
    criterion,
    optimizer,
    *,
    input_key="image",
    scaler=None,
    scheduler=None,
    grad_clip=None,
    amp=None,
):
    """One optimizer step of the project's training: forward (autocast to the `amp` device type, None = float32),
    loss, backward, gradient clipping, optimizer (and scheduler) step. `make train` and every training run of
    the doctor take this step, so a bug here shows up in both. Returns (loss value, {term: value}); a
    non-finite loss returns before the optimizer is touched (the caller decides what that means)."""
    with torch.autocast(amp or "cpu", enabled=amp is not None):
        out = model(batch[input_key])
    result = criterion(as_float(out), batch)
    loss, parts = result if isinstance(result, tuple | list) else (result, {})
    value = loss.item()
    if not math.isfinite(value):
        return value, parts
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if grad_clip:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return value, parts


def run_epoch(model, loader, criterion, optimizer, *, device, memory_format=None, input_key="image", **step):
    """One pass of training over `loader` with `train_step` (its keyword arguments in `step`): yields
    (index, batch, loss value, loss terms) after each step. A non-finite loss is yielded before any update;
    the caller decides (`make train` stops with an error, the doctor records a diverged run)."""
    model.train()
    for b, batch in enumerate(loader):
        batch = batches.to_device(batch, device, memory_format, input_key)
        value, parts = train_step(model, batch, criterion, optimizer, input_key=input_key, **step)
        yield b, batch, value, parts


def step_settings(cfg, device, scaler=None, scheduler=None):
    """train_step's knobs for a config: what `make train` uses, and what the doctor's runs use."""
    return dict(
        scaler=scaler,
        scheduler=scheduler,
        grad_clip=cfg.training.get("grad_clip"),
        amp=device.type if use_amp(cfg, device) else None,
    )


def train_one_epoch(c, epoch, state, stop, progress):
    cfg, t = c.cfg, c.cfg.training
    steps = run_epoch(
        c.model,
        progress,
        c.criterion,
        c.optimizer,
        device=c.device,
        memory_format=memory_format(cfg),
        input_key=c.task.input_key,
        **step_settings(cfg, c.device, c.scaler, c.scheduler),
    )
    for _, batch, loss_value, parts in steps:
        if not math.isfinite(loss_value):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainingDiverged(
                f"loss is {loss_value} at epoch {epoch + 1}, step {state['step'] + 1} ({terms}); training "
                f"stopped. The last good checkpoint (from the last finished epoch) is kept: "
                f"{checkpoint_dir(cfg) / 'last.pt'}. Lower training.lr, keep training.grad_clip on, "
                "or run the doctor (make doctor)."
            )
        state["step"] += 1
        state["batch"] += 1
        state["seen"] += len(batch[c.task.input_key])
        state["loss_sum"] += loss_value
        state["losses"].append(loss_value)
        for k, v in parts.items():
            if k != "loss":
                state["terms"][k] = state["terms"].get(k, 0.0) + float(v)
        if state["step"] % t.log_every == 0:
            state["log"](
                {"train/loss": loss_value, "lr": c.scheduler.get_last_lr()[0]}
                | {f"train/{k}": float(v) for k, v in parts.items()},
                state["step"],
            )
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{loss_value:.4f}")
        if stop.requested():
            raise StopRequested


def epoch_training_metrics(state):
    """This process's epoch of step losses for the history: the mean and variance of their asinh and their
    count (the symptom scan's epoch-level tests) and the mean of each loss term, `train/<term>_epoch`.
    asinh is log-like for large values, linear near 0 and defined for any sign: one exploding step among
    ordinary ones would otherwise make the variance so large that no epoch-level test could see the rise."""
    mean, var, n = stats.epoch_summary(np.arcsinh(state["losses"]))
    terms = {f"train/{k}_epoch": v / max(1, n) for k, v in state["terms"].items()}
    # one step has no variance: 0 keeps the trackers' numbers finite (the scan skips epochs of < 2 steps)
    return {
        "train/asinh_loss_epoch": mean if n else 0.0,
        "train/asinh_loss_epoch_var": var if n > 1 else 0.0,
        "train/loss_epoch_steps": n,
    } | terms


def as_float(out):
    """The network's output in float32 (autocast may give bfloat16/float16) for the loss."""
    return {k: v.float() for k, v in out.items()} if isinstance(out, dict) else out.float()


@torch.no_grad()
def validate(c):
    """The validation loss and the median of each of the task's per-sample errors (`val/<name>_median`)."""
    model = c.model.module if hasattr(c.model, "module") else c.model
    model.eval()
    errors, loss_sum, n = {}, 0.0, 0
    for batch in c.val_loader:
        batch = to_device(batch, c.device, c.cfg)
        with torch.autocast(c.device.type, enabled=use_amp(c.cfg, c.device)):
            out = model(batch[c.task.input_key])
        out = as_float(out)
        loss, _ = c.criterion(out, batch)
        for name, values in c.task.val_errors(model, out, batch).items():
            errors.setdefault(name, []).append(torch.as_tensor(values, dtype=torch.float32).cpu())
        size = len(batch[c.task.input_key])
        loss_sum += loss.item() * size
        n += size
    errors = {name: torch.cat(values) for name, values in errors.items()}
    totals = torch.tensor([loss_sum, n], dtype=torch.float64)
    if dist.is_initialized():  # medians need every rank's errors
        errors = {name: gather(values.to(c.device)).cpu() for name, values in errors.items()}
        totals = totals.to(c.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return {"val/loss": float(totals[0] / totals[1])} | {
        f"val/{name}_median": float(values.median()) for name, values in errors.items()
    }


def gather(x):
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


@torch.no_grad()
def prediction_grid(c, n=16):
    """The task's picture of its predictions on `n` validation samples (Task.preview), or None."""
    model = c.model.module if hasattr(c.model, "module") else c.model
    model.eval()
    batch = to_device(next(iter(DataLoader(c.val_set, batch_size=n))), c.device, c.cfg)
    return c.task.preview(model, batch)


# --- the loop ------------------------------------------------------------------------------------------------


class SigtermFlag:
    """SIGTERM (SLURM preemption, `kill`) asks the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def handle(self, signum, frame):
        self.flag = True

    def requested(self):
        if not dist.is_initialized():
            return self.flag
        flag = torch.tensor([float(self.flag)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())


def fit(cfg, c=None):
    """Train `cfg` (optionally with prebuilt components `c`); returns the final validation metrics."""
    rank, world = rank_and_world()
    c = c or build(cfg)
    t = cfg.training
    ckpt_dir = checkpoint_dir(cfg)
    state = {"epoch": 0, "step": 0, "batch": 0, "best": math.inf, "history": []}
    if t.resume and (ckpt_dir / "last.pt").is_file():
        checkpoint = load_checkpoint(ckpt_dir / "last.pt", c.device)
        c.model.load_state_dict(checkpoint["model"])
        c.optimizer.load_state_dict(checkpoint["optimizer"])
        c.scheduler.load_state_dict(checkpoint["scheduler"])
        c.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        state |= {k: checkpoint[k] for k in ("epoch", "step", "batch", "best", "history")}
        if rank == 0:
            print(f"resuming from {ckpt_dir / 'last.pt'} at epoch {state['epoch']} step {state['step']}")
    elif t.resume and rank == 0:
        print(f"training.resume=true but {ckpt_dir / 'last.pt'} does not exist: starting from scratch")
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            c.model, device_ids=[c.device.index] if c.device.type == "cuda" else None
        )
        c = dataclasses.replace(c, model=ddp_model)
    run = tracking.start_run(cfg, "training") if rank == 0 else tracking.Run()
    metrics = {}

    def save(name, **extra):
        keep = {k: state[k] for k in ("epoch", "step", "batch", "best", "history")}
        save_checkpoint(ckpt_dir / name, c, keep | extra)

    with SigtermFlag() as stop:
        try:
            while state["epoch"] < t.epochs:
                epoch = state["epoch"]
                # a resumed epoch skips the batches trained on before the stop (loaders.py: why it is exact)
                start_epoch(c.train_loader, epoch, state["batch"], cfg.seed)
                state |= {"seen": 0, "loss_sum": 0.0, "losses": [], "terms": {}, "log": run.log}
                start = time.perf_counter()
                progress = tqdm(
                    c.train_loader,
                    desc=f"epoch {epoch + 1}/{t.epochs}",
                    disable=rank != 0 or not t.progress,
                    leave=False,
                    dynamic_ncols=True,
                )
                train_one_epoch(c, epoch, state, stop, progress)
                seconds = time.perf_counter() - start
                metrics = validate(c)
                metrics |= epoch_training_metrics(state) | {
                    "epoch": epoch + 1,
                    "train/loss_epoch": state["loss_sum"] / max(1, state["batch"]),
                    "train/images_per_s": state["seen"] * world / seconds,
                }
                state["epoch"] += 1
                state["batch"] = 0
                state["history"].append({k: float(v) for k, v in metrics.items()})
                if rank == 0:
                    run.log(metrics, step=state["step"])
                    score = metrics[f"val/{t.select_metric}"]
                    if score < state["best"]:
                        state["best"] = score
                        save("best.pt")
                    save("last.pt")
                    errors = "  ".join(
                        f"{k[4:].removesuffix('_median')} {v:.2f}"
                        for k, v in metrics.items()
                        if k.startswith("val/") and k.endswith("_median")
                    )
                    print(
                        f"epoch {epoch + 1}/{t.epochs}  loss {metrics['train/loss_epoch']:.4f}  val {errors}  "
                        f"({metrics['train/images_per_s']:.0f} samples/s)",
                        flush=True,
                    )
            if rank == 0:  # the doctor's symptoms, as far as this run's history shows them
                symptom_scan.report(
                    state["history"],
                    Path(cfg.paths.training) / "symptoms.json",
                    n_val=len(c.val_set),
                    th=symptom_scan.thresholds(cfg),
                )
            grid = prediction_grid(c) if rank == 0 and t.log_predictions else None
            if grid is not None:
                run.log_image("val/predictions", grid.permute(1, 2, 0).numpy(), "the task's preview")
        except StopRequested:
            if rank == 0:
                save("last.pt")
            raise
        finally:
            run.finish()
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    try:
        init_distributed(cfg)
        metrics = fit(cfg)
        if rank_and_world()[0] == 0:
            print(
                f"checkpoints in {checkpoint_dir(cfg)}; final validation: "
                + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            )
    except StopRequested:
        print(f"stopped by SIGTERM; resume with training.resume=true from {checkpoint_dir(cfg) / 'last.pt'}")
        sys.exit(143)
    except (TrainingDiverged, ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Call main from the importable module, not from this __main__ copy: Hydra's submitit launchers
    # (hydra/launcher=slurm, submitit_local) pickle the task function, and only that one pickles by name.
    importlib.import_module(__spec__.name).main()
