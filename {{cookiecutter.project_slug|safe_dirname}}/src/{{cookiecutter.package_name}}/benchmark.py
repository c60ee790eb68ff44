"""Stage 3 benchmark: does the default config meet its targets on this machine? Prints a table, writes
`3_training/benchmark.json`.

    python -m <package>.benchmark                                   # all of it (about 20 min on 2 cores)
    python -m <package>.benchmark training.benchmark.pipeline=false # loop and loader throughput only (~1 min)
    python -m <package>.benchmark experiment=smoke training.benchmark.experiments=[]   # a quick check

1. Pipeline: capture, train and evaluate as separate commands, exactly as `make capture train evaluate`
   runs them, timed by the wall clock: the default config, then each experiment in
   `training.benchmark.experiments` (the talk's Euler baseline) on the same captured data and budget.
   Each run lives in `3_training/benchmark/<experiment>/` (its own paths.root).
2. Training-loop overhead: images/s of `training.train_one_epoch` against a bare PyTorch loop (batch ->
   forward -> loss -> backward -> step) on the same model, data loader and batch size, measured in turns
   in one process so both see the same machine load. Ratio = ours / bare.
3. Loader headroom: images/s the training DataLoader delivers on its own, over what the loop consumes.

Timings are wall-clock on whatever else the machine is doing: the load average is recorded beside them.
"""

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from tqdm import tqdm

from . import tracking, training
from .files import write_json
from .paths import CONFIG_DIR

PACKAGE = __package__
SRC_DIR = Path(__file__).resolve().parents[1]


def child_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(module, overrides, log_path):
    """`python -m <package>.<module> overrides...` -> (wall seconds, CPU seconds); its output goes to log_path.

    The CPU seconds (user + system, all threads) do not grow when other programs share the machine, so
    CPU seconds / cores bounds the wall time this command would take on an idle machine from below.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])}
    start, cpu_start = time.perf_counter(), child_cpu_seconds()
    result = subprocess.run(
        [sys.executable, "-m", f"{PACKAGE}.{module}", *overrides], env=env, capture_output=True, text=True
    )
    seconds, cpu_seconds = time.perf_counter() - start, child_cpu_seconds() - cpu_start
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"{module} {' '.join(overrides)} failed (exit {result.returncode}); see {log_path}"
        )
    return seconds, cpu_seconds


def pipeline(cfg, experiment, passthrough):
    """Capture once, then train + evaluate each experiment on that data; wall seconds and test metrics."""
    bench_dir = Path(cfg.paths.training) / "benchmark"
    experiments = [experiment, *(e for e in cfg.training.benchmark.experiments if e != experiment)]
    results, data_root, capture = {}, None, None
    for experiment in experiments:
        root = bench_dir / experiment
        args = [f"experiment={experiment}", f"paths.root={root}", *passthrough]
        if data_root is None:
            print(f"[{experiment}] capture ...", flush=True)
            capture = run_command("data.capture", args, root / "capture.log")
            data_root = root / "2_data" / "dataset"
        args.append(f"data.root={data_root}")
        print(f"[{experiment}] train ...", flush=True)
        train = run_command("training", [*args, "training.progress=false"], root / "train.log")
        print(f"[{experiment}] evaluate ...", flush=True)
        evaluate = run_command("evaluation", args, root / "evaluate.log")
        metrics = json.loads((root / "3_training" / "metrics.json").read_text())
        history = torch.load(root / "3_training/checkpoints/last.pt", weights_only=True)["history"]
        results[experiment] = {
            "capture_s": capture[0],
            "train_s": train[0],
            "evaluate_s": evaluate[0],
            "total_s": capture[0] + train[0] + evaluate[0],
            "capture_cpu_s": capture[1],
            "train_cpu_s": train[1],
            "evaluate_cpu_s": evaluate[1],
            "total_cpu_s": capture[1] + train[1] + evaluate[1],
            "train_images_per_s": statistics.median(h["train/images_per_s"] for h in history),
            **{
                k: metrics[k] for k in ("re_deg_median", "te_cm_median", "add_s_01d", "acc_5deg5cm", "n_test")
            },
        }
        r = results[experiment]
        print(f"[{experiment}] capture+train+evaluate {r['total_s']:.0f} s wall ({r['total_cpu_s']:.0f} CPU s): "
              f"re {r['re_deg_median']:.2f} deg, te {r['te_cm_median']:.2f} cm (medians)", flush=True)  # fmt: skip
    return results, data_root


def batches(loader, n):
    return itertools.islice(iter(loader), n)


def bare_loop(c, n):
    """The minimal loop: what any PyTorch training step has to do, nothing else (in the same precision)."""
    model, optimizer = c.model, c.optimizer
    model.train()
    amp = training.use_amp(c.cfg, c.device)
    images = 0
    start = time.perf_counter()
    for batch in batches(c.train_loader, n):
        batch = training.to_device(batch, c.device, c.cfg)
        with torch.autocast(c.device.type, enabled=amp):
            out = model(batch["image"])
        loss, _ = c.criterion({k: v.float() for k, v in out.items()}, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(batch["image"])
    return images / (time.perf_counter() - start)


def our_loop(c, n):
    """training.train_one_epoch as fit() calls it: progress bar, NaN check, clipping, AMP scaler, schedule."""
    state = {"step": 0, "batch": 0, "seen": 0, "loss_sum": 0.0, "log": tracking.Run().log}
    progress = tqdm(batches(c.train_loader, n), total=n, disable=not c.cfg.training.progress, leave=False)
    start = time.perf_counter()
    training.train_one_epoch(c, 0, state, training.SigtermFlag(), progress)
    return state["seen"] / (time.perf_counter() - start)


def loader_only(c, n):
    images = 0
    start = time.perf_counter()
    for batch in batches(c.train_loader, n):
        images += len(training.to_device(batch, c.device, c.cfg)["image"])
    return images / (time.perf_counter() - start)


def throughput(cfg):
    b = cfg.training.benchmark
    with open_dict(cfg):  # the LR schedule must outlast every measured step
        cfg.training.epochs = 1_000_000
    c = training.build(cfg)
    steps = min(b.steps, len(c.train_loader))
    bare_loop(c, b.warmup_steps)  # first steps pay for allocations and kernel selection
    bare, ours = [], []
    for _ in range(b.rounds):  # in turns, so a change in machine load hits both
        bare.append(bare_loop(c, steps))
        ours.append(our_loop(c, steps))
    loader = max(loader_only(c, steps) for _ in range(b.rounds))
    ratios = [o / b_ for o, b_ in zip(ours, bare, strict=True)]
    return {
        "batch_size": cfg.training.batch_size,
        "steps_per_round": steps,
        "rounds": b.rounds,
        "bare_images_per_s": statistics.median(bare),
        "ours_images_per_s": statistics.median(ours),
        "loop_ratio": statistics.median(ratios),
        "loader_images_per_s": loader,
        "loader_ratio": loader / statistics.median(ours),
    }


def checks(result, targets, experiment):
    out = {
        "loop_ratio": result["throughput"]["loop_ratio"] >= targets.loop_ratio,
        "loader_ratio": result["throughput"]["loader_ratio"] >= targets.loader_ratio,
    }
    run = result.get("pipeline", {}).get(experiment)
    if run:
        out["pipeline_wall_s"] = run["total_s"] <= targets.pipeline_wall_s
        out["re_deg_median"] = run["re_deg_median"] <= targets.re_deg_median
        out["te_cm_median"] = run["te_cm_median"] <= targets.te_cm_median
    return out


def print_table(result, targets):
    print("\n== pipeline: capture + train + evaluate (wall clock) ==")
    runs = result.get("pipeline", {})
    if runs:
        print(f"{'experiment':<12}{'capture s':>10}{'train s':>9}{'eval s':>8}{'total s':>9}{'img/s':>7}"
              f"{'re° med':>9}{'te cm med':>10}{'ADD(-S)':>9}{'5°5cm':>7}")  # fmt: skip
        for name, r in runs.items():
            print(f"{name:<12}{r['capture_s']:>10.0f}{r['train_s']:>9.0f}{r['evaluate_s']:>8.0f}{r['total_s']:>9.0f}"
                  f"{r['train_images_per_s']:>7.0f}{r['re_deg_median']:>9.2f}{r['te_cm_median']:>10.2f}"
                  f"{r['add_s_01d']:>9.3f}{r['acc_5deg5cm']:>7.3f}")  # fmt: skip
        for name, r in runs.items():
            print(f"{name:<12}{r['capture_cpu_s']:>10.0f}{r['train_cpu_s']:>9.0f}{r['evaluate_cpu_s']:>8.0f}"
                  f"{r['total_cpu_s']:>9.0f}   <- CPU seconds (all cores); / {os.cpu_count()} cores = "
                  f"{r['total_cpu_s'] / os.cpu_count():.0f} s")  # fmt: skip
        print("(the capture is shared: every experiment trains on the same images)")
    t = result["throughput"]
    print("\n== training loop and loader (images/s, same model, data and batch size) ==")
    print(f"bare PyTorch loop  {t['bare_images_per_s']:8.0f}")
    print(
        f"our training loop  {t['ours_images_per_s']:8.0f}   ratio {t['loop_ratio']:.3f}  (target >= {targets.loop_ratio})"
    )
    print(f"DataLoader alone   {t['loader_images_per_s']:8.0f}   ratio {t['loader_ratio']:.1f}x (target >= {targets.loader_ratio}x)")  # fmt: skip
    print(
        f"\nload average before/after: {result['machine']['load_before']} / {result['machine']['load_after']}"
    )
    for name, ok in result["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def benchmark(cfg, experiment="default", passthrough=()):
    """Run the benchmark for `experiment` (the config `cfg` was composed with); returns what it writes."""
    b = cfg.training.benchmark
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": cfg.training.threads or torch.get_num_threads(),
                          "load_before": [round(x, 2) for x in os.getloadavg()]}}  # fmt: skip
    if b.pipeline:
        result["pipeline"], data_root = pipeline(cfg, experiment, list(passthrough))
        with open_dict(cfg):
            cfg.data.root = str(data_root)
    print("training loop and loader throughput ...", flush=True)
    result["throughput"] = throughput(cfg)
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = dict(b.targets)
    result["experiment"] = experiment
    result["checks"] = checks(result, b.targets, experiment)
    write_json(Path(cfg.paths.training) / "benchmark.json", result)
    print_table(result, b.targets)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    # The command line's own overrides go to every pipeline command, except those the benchmark sets itself.
    own = ("experiment=", "paths.root=", "training.benchmark.", "data.root=")
    passthrough = [o for o in HydraConfig.get().overrides.task if not o.startswith(own)]
    experiment = HydraConfig.get().runtime.choices.get("experiment") or "default"
    try:
        benchmark(cfg, experiment, passthrough)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
