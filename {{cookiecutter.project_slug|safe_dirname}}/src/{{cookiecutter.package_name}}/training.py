"""Stage 3: train the pose network. Plain PyTorch, read it top to bottom.

    python -m <package>.training                              # the default config (CPU)
    python -m <package>.training experiment=baseline          # the talk's Euler-angle baseline
    python -m <package>.training training.resume=true         # continue exactly where the last run stopped
    python -m torch.distributed.run --nproc_per_node 2 -m <package>.training   # DDP (gloo on CPU, nccl on GPU)

Writes `3_training/checkpoints/last.pt` every epoch (and on SIGTERM, e.g. a SLURM preemption) and
`best.pt` when the validation score improves; both load with `torch.load(path, weights_only=True)`.
`build(cfg)` returns every piece (model, data, optimizer, ...) so the doctor and the benchmark reuse
exactly what training uses; `load_model(path)` gives back a ready `PoseEstimator`.
"""

import dataclasses
import functools
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
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import tracking
from .data import bop
from .debugging import zoo
from .files import atomic_path
from .paths import CONFIG_DIR
from .pose import geometry, losses
from .pose import metrics as pose_metrics
from .pose.model import PoseEstimator, build_model

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


def pick_device(cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


# --- reproducibility ---------------------------------------------------------------------------------------


def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def seed_worker(worker_id):
    # DataLoader seeds torch in each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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


class EpochSampler(DistributedSampler):
    """DistributedSampler (also for one process) that can start part-way into an epoch.

    The order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches; `start`
    skips the samples a preempted run had already trained on in that epoch.
    """

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self):
        return self.num_samples - self.start


# --- building blocks -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    cfg: object
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
    model_points: torch.Tensor  # mm, all PLY vertices
    symmetric: bool
    diameter_mm: float


def rotate_in_plane(batch, max_deg):
    """Augmentation: turn the camera about its optical axis by a random angle in [-max_deg, max_deg].

    The image turns about the principal point and the labels turn with it, R' = Rz R and t' = Rz t, so
    the pose stays exact (for square pixels, fx = fy, which the synthetic camera has). A new view of the
    object's orientation per sample, without rendering more images. Corners outside the old image are black.
    `batch` holds image [B,3,H,W], K, R, t; the random angles come from torch's global generator.
    """
    K = batch["K"]
    if not torch.allclose(K[:, 0, 0], K[:, 1, 1], rtol=1e-4) or K[:, 0, 1].abs().max() > 1e-6:
        raise ValueError("training.augment.rotate_deg needs square pixels (fx = fy, no skew); set it to 0")
    images = batch["image"]
    angles = (torch.rand(len(K), device=K.device) * 2 - 1) * math.radians(max_deg)
    cos, sin, zero, one = angles.cos(), angles.sin(), torch.zeros_like(angles), torch.ones_like(angles)
    Rz = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], -1).view(-1, 3, 3)
    # With fx = fy, R' = Rz R moves a pixel p (x right, y down) to c + Rz2 (p - c) about the principal point c.
    # Each output pixel samples the input at c + Rz2^T (p' - c): one grid_sample for the whole batch
    # (torchvision's rotate turns a whole batch by one angle). Pixel centres are at integers (BOP/OpenCV).
    H, W = images.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(H, dtype=K.dtype, device=K.device),
        torch.arange(W, dtype=K.dtype, device=K.device),
        indexing="ij",
    )
    du, dv = u - K[:, 0, 2, None, None], v - K[:, 1, 2, None, None]  # [B,H,W]
    c, s = cos[:, None, None], sin[:, None, None]
    src_u = K[:, 0, 2, None, None] + c * du + s * dv
    src_v = K[:, 1, 2, None, None] - s * du + c * dv
    # grid_sample's align_corners=False puts pixel i's centre at (2i + 1) / size - 1
    grid = torch.stack([(2 * src_u + 1) / W - 1, (2 * src_v + 1) / H - 1], -1).to(images.dtype)
    turned = nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return batch | {"image": turned, "R": Rz @ batch["R"], "t": (Rz @ batch["t"].unsqueeze(-1)).squeeze(-1)}


def collate(items, max_deg=0, transform=None):
    """The loaders' collate: stack the samples, `rotate_in_plane` the whole batch at once (max_deg > 0),
    then `transform` it (the bug zoo's faults in what the network sees, debugging/zoo.py)."""
    batch = torch.utils.data.default_collate(items)
    if max_deg:
        batch = rotate_in_plane(batch, max_deg)
    return transform(batch) if transform else batch


def build_datasets(cfg):
    d = cfg.data
    args = dict(image_size=d.image_size, preload=d.preload, min_visib_fract=d.min_visib_fract)
    train_set = bop.BopDataset(d.root, d.splits.train, d.obj_id, **args)
    val_set = bop.BopDataset(d.root, d.splits.val, d.obj_id, **args)
    return train_set, val_set


def build_loaders(cfg, train_set, val_set, batch_transform=None):
    t = cfg.training
    rank, world = rank_and_world()
    if t.batch_size % world:
        raise ValueError(f"training.batch_size={t.batch_size} must be divisible by the {world} processes")
    sampler = EpochSampler(train_set, num_replicas=world, rank=rank, shuffle=t.shuffle, seed=cfg.seed)
    loader_args = dict(num_workers=t.num_workers, pin_memory=t.get("pin_memory", False))
    if t.num_workers > 0:
        loader_args |= dict(worker_init_fn=seed_worker, persistent_workers=False)
    # The augmentation happens in the loader, so the doctor's probes see the same batches as training.
    train_collate = functools.partial(collate, max_deg=t.augment.rotate_deg, transform=batch_transform)
    val_collate = functools.partial(collate, transform=batch_transform)
    train_loader = DataLoader(
        train_set,
        batch_size=t.batch_size // world,
        sampler=sampler,
        collate_fn=train_collate,
        drop_last=len(train_set) // world >= t.batch_size // world,
        generator=torch.Generator().manual_seed(cfg.seed),
        **loader_args,
    )
    val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    val_loader = DataLoader(
        val_set, batch_size=t.batch_size // world, sampler=val_sampler, collate_fn=val_collate, **loader_args
    )
    return train_loader, val_loader


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
    train_set, val_set = build_datasets(cfg)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set)
    info = bop.load_models_info(cfg.data.root)[cfg.data.obj_id]
    symmetric = bop.is_symmetric(info)
    points = torch.as_tensor(bop.load_model_points(cfg.data.root, cfg.data.obj_id), dtype=torch.float32)
    criterion = losses.build_criterion(cfg.loss, points, symmetric, image_size=cfg.data.image_size)
    model = build_model(cfg).to(device, memory_format=memory_format(cfg))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    # bfloat16 has float32's exponent range: only float16 (CUDA) needs loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp(cfg, device) and device.type == "cuda")
    return Components(
        cfg=cfg,
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
        model_points=points,
        symmetric=symmetric,
        diameter_mm=float(info["diameter"]),
    )


def use_amp(cfg, device):
    """Mixed precision: float16 on CUDA (with the gradient scaler); bfloat16 on a CPU with native bf16
    instructions (AVX512-BF16 or AMX: 1.7x the float32 images/s of the default model on the 2-core EPYC
    we benchmark on); otherwise float32."""
    if not cfg.training.amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def cpu_has_native_bf16():
    # torch only exposes these checks privately; without them, stay in float32 (bf16 is emulated and slow)
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(check is not None and check() for check in checks)


def memory_format(cfg):
    # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their faster convolution kernels.
    return torch.channels_last if cfg.training.channels_last else torch.contiguous_format


def to_device(batch, device, cfg):
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["image"] = batch["image"].contiguous(memory_format=memory_format(cfg))
    return batch


# --- checkpoints ---------------------------------------------------------------------------------------------


def checkpoint_dir(cfg):
    return Path(cfg.training.checkpoint_dir)


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


def load_checkpoint(path, device="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train first: make train)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read ({error})") from error


def load_model(path, device="cpu"):
    """A checkpoint -> (PoseEstimator in eval mode on `device`, the config it was trained with)."""
    checkpoint = load_checkpoint(path, device)
    cfg = OmegaConf.create(checkpoint["config"])
    net = build_model(cfg)
    net.load_state_dict(checkpoint["model"])
    return PoseEstimator(net).to(device).eval(), cfg


# --- one epoch -----------------------------------------------------------------------------------------------


class StopRequested(Exception):
    pass


def train_one_epoch(c, epoch, state, stop, progress):
    model, cfg = c.model, c.cfg
    model.train()
    t = cfg.training
    amp = use_amp(cfg, c.device)
    for batch in progress:
        batch = to_device(batch, c.device, c.cfg)
        with torch.autocast(c.device.type, enabled=amp):
            out = model(batch["image"])
        loss, parts = c.criterion({k: v.float() for k, v in out.items()}, batch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainingDiverged(
                f"loss is {loss_value} at epoch {epoch + 1}, step {state['step'] + 1} ({terms}); training "
                f"stopped. The last good checkpoint (from the last finished epoch) is kept: "
                f"{checkpoint_dir(cfg) / 'last.pt'}. Lower training.lr, keep training.grad_clip on, "
                "or run the doctor (make doctor)."
            )
        c.optimizer.zero_grad(set_to_none=True)
        c.scaler.scale(loss).backward()
        if t.grad_clip:
            c.scaler.unscale_(c.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        c.scaler.step(c.optimizer)
        c.scaler.update()
        c.scheduler.step()
        state["step"] += 1
        state["batch"] += 1
        state["seen"] += batch["image"].shape[0]
        state["loss_sum"] += loss_value
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


@torch.no_grad()
def validate(c):
    """Median rotation error (deg) and translation error (cm) on the validation split, and the val loss."""
    model = c.model.module if hasattr(c.model, "module") else c.model
    model.eval()
    re, te, loss_sum, n = [], [], 0.0, 0
    for batch in c.val_loader:
        batch = to_device(batch, c.device, c.cfg)
        with torch.autocast(c.device.type, enabled=use_amp(c.cfg, c.device)):
            out = model(batch["image"])
        out = {k: v.float() for k, v in out.items()}
        loss, _ = c.criterion(out, batch)
        R, t = model.decode(out, batch["K"], batch["image"].shape[-2:])
        # the same error definitions as the test-set evaluation (bop_toolkit's re and te)
        re.append(torch.as_tensor(pose_metrics.rotation_error_deg(R, batch["R"]), dtype=torch.float32))
        te.append(
            torch.as_tensor(pose_metrics.translation_error_mm(t, batch["t"]) / 10.0, dtype=torch.float32)
        )
        loss_sum += loss.item() * len(R)
        n += len(R)
    re, te, totals = torch.cat(re), torch.cat(te), torch.tensor([loss_sum, n], dtype=torch.float64)
    if dist.is_initialized():  # medians need every rank's errors
        re, te = gather(re.to(c.device)).cpu(), gather(te.to(c.device)).cpu()
        totals = totals.to(c.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return {
        "val/loss": float(totals[0] / totals[1]),
        "val/re_deg_median": float(re.median()),
        "val/te_cm_median": float(te.median()),
    }


def gather(x):
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


@torch.no_grad()
def prediction_grid(c, n=16):
    """Validation images with the predicted (bright) and true (dark) object axes drawn on them."""
    model = c.model.module if hasattr(c.model, "module") else c.model
    model.eval()
    batch = to_device(next(iter(DataLoader(c.val_set, batch_size=n))), c.device, c.cfg)
    images = batch["image"]
    R, t = model.decode(model(images), batch["K"], images.shape[-2:])
    axes = torch.cat([torch.zeros(1, 3), torch.eye(3)]).to(c.device) * (0.5 * c.diameter_mm)
    drawn = []
    for i in range(len(images)):
        image = (images[i].clamp(0, 1) * 255).to(torch.uint8).cpu()
        for (rot, trans), shade in (((batch["R"][i], batch["t"][i]), 110), ((R[i], t[i]), 255)):
            uv = geometry.project(axes, rot, trans, batch["K"][i]).cpu()
            for axis in range(3):
                color = [0, 0, 0]
                color[axis] = shade
                image = torchvision.utils.draw_keypoints(
                    image,
                    uv[[0, axis + 1]][None],
                    connectivity=[(0, 1)],
                    colors=tuple(color),
                    radius=0,
                    width=1,
                )
        drawn.append(image)
    return torchvision.utils.make_grid(drawn, nrow=int(math.sqrt(n)), padding=2)


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
    c = zoo.apply(c or build(cfg))  # bug-zoo faults (debugging.fault), a no-op by default
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
                c.train_loader.sampler.set_epoch(epoch)
                c.train_loader.sampler.start = state["batch"] * c.train_loader.batch_size
                # Worker seeds come from this generator: reseeding per epoch makes a resumed epoch identical.
                c.train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
                state |= {"seen": 0, "loss_sum": 0.0, "log": run.log}
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
                metrics |= {
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
                    print(
                        f"epoch {epoch + 1}/{t.epochs}  loss {metrics['train/loss_epoch']:.4f}  "
                        f"val re {metrics['val/re_deg_median']:.2f} deg  te {metrics['val/te_cm_median']:.2f} cm  "
                        f"({metrics['train/images_per_s']:.0f} img/s)",
                        flush=True,
                    )
            if rank == 0 and t.log_predictions:
                run.log_image(
                    "val/predictions", prediction_grid(c).permute(1, 2, 0).numpy(), "bright: predicted"
                )
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
