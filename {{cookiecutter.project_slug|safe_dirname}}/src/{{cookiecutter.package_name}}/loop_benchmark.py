"""How well training uses the machine (part of `make benchmark`, src/<package>/benchmark.py):

1. Loop overhead: our training loop (`training.train_one_epoch` as `fit()` calls it, with the configured
   logger) against a bare PyTorch loop (batch -> forward -> loss -> backward -> step) on the same model,
   loader, batch size and precision. Each round times a fresh pass over `steps` batches, and the clock
   includes creating the loader's iterator (workers, prefetch) for every side alike; on a GPU every side
   synchronizes before the clock starts and before it stops. The sides take turns (the order rotates each
   round) so a change in machine load hits all of them. Ratio = (total images / total seconds of ours)
   / (the same for the bare loop).
2. Loader headroom: images/s the training DataLoader delivers on its own (fetch + move to the device) over
   what our loop consumes, both from totals over the same rounds.
3. Machine use: training FLOPs per image (forward + backward, counted by torch.utils.flop_counter) times
   our images/s, as a fraction of a matmul peak measured here in bfloat16 and float32.
"""

import itertools
import time

import torch
from omegaconf import open_dict
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from . import tracking, training


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(c, n, loop, state):
    """(images, seconds) of `loop(c, batches, state)` over the first `n` batches of a fresh pass over
    the training loader. The clock covers creating the iterator: worker start-up and prefetch count."""
    synchronize(c.device)
    start = time.perf_counter()
    images = loop(c, itertools.islice(iter(c.train_loader), n), state)
    synchronize(c.device)
    return images, time.perf_counter() - start


def bare_loop(c, batches, state):
    """The minimal loop: what any PyTorch training step has to do, nothing else (in the same precision)."""
    model, optimizer = c.model, c.optimizer
    model.train()
    amp = training.use_amp(c.cfg, c.device)
    images = 0
    for batch in batches:
        batch = training.to_device(batch, c.device, c.cfg)
        with torch.autocast(c.device.type, enabled=amp):
            out = model(batch["image"])
        loss, _ = c.criterion({k: v.float() for k, v in out.items()}, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(batch["image"])
    return images


def our_loop(c, batches, state):
    """training.train_one_epoch as fit() calls it: progress bar, NaN check, clipping, AMP scaler, schedule,
    logging every training.log_every steps to the run in state["log"]."""
    progress = tqdm(batches, disable=not c.cfg.training.progress, leave=False)
    state["seen"] = 0
    training.train_one_epoch(c, 0, state, training.SigtermFlag(), progress)
    return state["seen"]


def loader_only(c, batches, state):
    return sum(len(training.to_device(batch, c.device, c.cfg)["image"]) for batch in batches)


def compare_loops(c, steps, warmup_steps, rounds, log, loops=None):
    """Time each loop in `loops` (name -> loop; default bare, ours, loader) for `rounds` rounds of `steps`
    batches; returns the totals, per-round figures and the ratios of the totals."""
    loops = loops or {"bare": bare_loop, "ours": our_loop, "loader": loader_only}
    state = {"step": 0, "batch": 0, "seen": 0, "loss_sum": 0.0, "losses": [], "terms": {}, "log": log}
    for loop in loops.values():  # first steps pay for allocations and kernel selection
        timed_round(c, warmup_steps, loop, state)
    names = list(loops)
    totals = {name: [0, 0.0] for name in names}
    per_round = []
    for r in range(rounds):
        measured = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            images, seconds = timed_round(c, steps, loops[name], state)
            measured[name] = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
            totals[name][0] += images
            totals[name][1] += seconds
        per_round.append(measured)
    result = {"steps_per_round": steps, "rounds": rounds, "per_round": per_round}
    for name, (images, seconds) in totals.items():
        result |= {
            f"{name}_images": images,
            f"{name}_seconds": seconds,
            f"{name}_images_per_s": images / seconds,
        }
    if "bare" in loops and "ours" in loops:
        result["loop_ratio"] = result["ours_images_per_s"] / result["bare_images_per_s"]
    if "loader" in loops and "ours" in loops:
        result["loader_ratio"] = result["loader_images_per_s"] / result["ours_images_per_s"]
    return result


def training_flops(step):
    """FLOPs that `step()` (a training step's forward and backward) runs, as torch.utils.flop_counter
    counts them: convolutions and matmuls, forward and backward; elementwise work is not counted."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def training_flops_per_image(c):
    batch = training.to_device(next(iter(c.train_loader)), c.device, c.cfg)
    c.model.train()

    def step():
        with torch.autocast(c.device.type, enabled=training.use_amp(c.cfg, c.device)):
            out = c.model(batch["image"])
        loss, _ = c.criterion({k: v.float() for k, v in out.items()}, batch)
        loss.backward()

    flops = training_flops(step)
    c.model.zero_grad(set_to_none=True)
    return flops / len(batch["image"])


def precision(cfg, device):
    """The precision training.use_amp picks for `cfg` on `device`: bfloat16 autocast on a CPU with native
    bf16, float16 on CUDA, else float32."""
    if not training.use_amp(cfg, device):
        return "float32"
    return "bfloat16" if device.type == "cpu" else "float16"


def matmul_peak(dtype, device, n=1024, seconds=0.3):
    """Best FLOP/s of an n x n x n torch.matmul in `dtype` on `device` with the current torch threads,
    over repeats for at least `seconds`."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up: kernel selection, packing buffers
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * n**3 / best


def machine_use(c, images_per_s, gemm_size):
    """Achieved training FLOP/s at `images_per_s`, and as a fraction of bf16 and float32 matmul peaks."""
    per_image = training_flops_per_image(c)
    achieved = per_image * images_per_s
    out = {
        "precision": precision(c.cfg, c.device),
        "flops_per_image": per_image,
        "achieved_flop_per_s": achieved,
        "torch_threads": torch.get_num_threads(),
        "gemm_size": gemm_size,
    }
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        peak = matmul_peak(dtype, c.device, gemm_size)
        out |= {f"gemm_peak_{name}_flop_per_s": peak, f"fraction_of_{name}_peak": achieved / peak}
    return out


def throughput(cfg):
    """Loop overhead, loader headroom and machine use of the training `cfg` on this machine."""
    b = cfg.training.benchmark
    with open_dict(cfg):  # the LR schedule must outlast every measured step
        cfg.training.epochs = 1_000_000
    c = training.build(cfg)  # build applies the configured fault, as fit() sees it
    steps = min(b.steps, len(c.train_loader))
    run = tracking.start_run(cfg, "benchmark")  # the logger fit() would log to
    try:
        result = compare_loops(c, steps, b.warmup_steps, b.rounds, run.log)
    finally:
        run.finish()
    return {
        "batch_size": cfg.training.batch_size,
        **result,
        **machine_use(c, result["ours_images_per_s"], b.gemm_size),
    }
