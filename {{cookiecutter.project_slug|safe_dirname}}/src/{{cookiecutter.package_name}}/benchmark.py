"""Stage 3 benchmark: does the default config meet its targets on this machine, over seeds and precisions?
Prints a table, writes `3_training/benchmark.json` and `benchmark.md`.

    python -m <package>.benchmark                                   # one seed, and the baseline (~20 min on 2 cores)
    python -m <package>.benchmark training.benchmark.seeds=[0,1,2] training.benchmark.float32=true
    python -m <package>.benchmark training.benchmark.pipeline=false # loop, loader and FLOP/s only (~1 min)
    python -m <package>.benchmark experiment=smoke training.benchmark.experiments=[]   # a quick check

1. Pipeline: capture, train and evaluate as separate commands, exactly as `make capture train evaluate`
   runs them, timed by the wall clock. One capture is shared by every run: the selected experiment once
   per seed in `training.benchmark.seeds`, once more with float32 forced (`training.benchmark.float32`:
   the path every CPU without native bfloat16 takes), then each experiment in
   `training.benchmark.experiments` (the talk's Euler baseline) with the first seed. The table gives
   min / median / max over the seeds. Each run lives in `3_training/benchmark/<experiment>/seed<S>[-float32]/`.
2. Training loop, loader and machine use: see loop_benchmark.py.

The checks use the worst run of the selected experiment (every seed and the float32 row) for accuracy,
and the worst seed in the precision this machine picks for wall time. Timings are wall-clock on whatever
else the machine is doing: the load average and the CPU model are recorded beside them.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import ListConfig, OmegaConf, open_dict

from . import checkpoints, tracking
from .files import write_json, write_text
from .loop_benchmark import precision, throughput
from .paths import CONFIG_DIR

PACKAGE = __package__
SRC_DIR = Path(__file__).resolve().parents[1]
# the headline figures of a run: (key, column title, format)
COLUMNS = [
    ("capture_s", "capture s", ".0f"),
    ("train_s", "train s", ".0f"),
    ("evaluate_s", "eval s", ".0f"),
    ("total_s", "total s", ".0f"),
    ("train_images_per_s", "img/s", ".0f"),
    ("re_deg_median", "rot. err. median °", ".2f"),
    ("te_cm_median", "transl. err. median cm", ".3f"),
    ("add_s_01d", "ADD(-S) < 0.1 d", ".3f"),
    ("acc_5deg5cm", "5°5cm", ".3f"),
]


def child_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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


def planned_runs(cfg, experiment):
    """[(experiment, seed, float32 forced)] in the order they run."""
    b = cfg.training.benchmark
    if b.get("seeds") is not None and not (
        isinstance(b.seeds, ListConfig) and all(isinstance(s, int) for s in b.seeds)
    ):
        raise ValueError(
            f"training.benchmark.seeds must be a list of integer seeds, e.g. [0,1,2] (got {b.seeds})"
        )
    seeds = list(b.get("seeds") or [cfg.seed])
    runs = [(experiment, seed, False) for seed in seeds]
    if b.get("float32"):
        runs.append((experiment, seeds[0], True))
    return runs + [(e, seeds[0], False) for e in b.experiments if e != experiment]


def pipeline(cfg, experiment, passthrough):
    """Capture once, then train + evaluate every planned run on that data; a list of rows (wall seconds,
    CPU seconds, precision, test metrics), and the captured data's root."""
    bench_dir = Path(cfg.paths.training) / "benchmark"
    rows, data_root, capture = [], None, None
    for name, seed, float32 in planned_runs(cfg, experiment):
        root = bench_dir / name / f"seed{seed}{'-float32' if float32 else ''}"
        args = [f"experiment={name}", f"paths.root={root}", *passthrough]
        if float32:
            args = [a for a in args if not a.startswith("training.amp=")] + ["training.amp=false"]
        label = f"{name} seed {seed}{' float32' if float32 else ''}"
        if data_root is None:
            print(f"[{label}] capture ...", flush=True)
            capture = run_command("data.capture", args, root / "capture.log")
            data_root = root / "2_data" / "dataset"
        args += [f"data.root={data_root}", f"seed={seed}"]
        print(f"[{label}] train ...", flush=True)
        train = run_command("training", [*args, "training.progress=false"], root / "train.log")
        print(f"[{label}] evaluate ...", flush=True)
        evaluate = run_command("evaluation", args, root / "evaluate.log")
        metrics = json.loads((root / "3_training" / "metrics.json").read_text())
        checkpoint = torch.load(root / "3_training/checkpoints/last.pt", weights_only=True)
        run_cfg = OmegaConf.create(checkpoint["config"])  # the precision training.use_amp picked for it
        row = {
            "experiment": name,
            "seed": seed,
            "float32_forced": float32,
            "precision": precision(run_cfg, checkpoints.pick_device(run_cfg)),
            "capture_s": capture[0],
            "train_s": train[0],
            "evaluate_s": evaluate[0],
            "total_s": capture[0] + train[0] + evaluate[0],
            "capture_cpu_s": capture[1],
            "train_cpu_s": train[1],
            "evaluate_cpu_s": evaluate[1],
            "total_cpu_s": capture[1] + train[1] + evaluate[1],
            "train_images_per_s": statistics.median(h["train/images_per_s"] for h in checkpoint["history"]),
            **{
                k: metrics[k] for k in ("re_deg_median", "te_cm_median", "add_s_01d", "acc_5deg5cm", "n_test")
            },
        }
        rows.append(row)
        print(f"[{label}] capture+train+evaluate {row['total_s']:.0f} s wall ({row['total_cpu_s']:.0f} CPU s), "
              f"{row['precision']}: re {row['re_deg_median']:.2f} deg, te {row['te_cm_median']:.3f} cm (medians)",
              flush=True)  # fmt: skip
    return rows, data_root


def seed_rows(rows, experiment):
    return [r for r in rows if r["experiment"] == experiment and not r["float32_forced"]]


def spread(rows):
    """{headline key: {min, median, max}} over `rows` (the seeds of one experiment)."""
    return {
        key: {
            "min": min(r[key] for r in rows),
            "median": statistics.median(r[key] for r in rows),
            "max": max(r[key] for r in rows),
        }
        for key, _, _ in COLUMNS
    }


def checks(result, targets, experiment):
    t = result["throughput"]
    out = {
        "loop_ratio": t["loop_ratio"] >= targets.loop_ratio,
        "loader_ratio": t["loader_ratio"] >= targets.loader_ratio,
    }
    rows = [r for r in result.get("pipeline", {}).get("runs", []) if r["experiment"] == experiment]
    # accuracy: the worst run, any seed or precision; wall time: the worst seed as this machine runs it
    if rows:
        out["pipeline_wall_s"] = (
            max(r["total_s"] for r in seed_rows(rows, experiment)) <= targets.pipeline_wall_s
        )
        out["re_deg_median"] = max(r["re_deg_median"] for r in rows) <= targets.re_deg_median
        out["te_cm_median"] = max(r["te_cm_median"] for r in rows) <= targets.te_cm_median
    return out


def run_name(row):
    return f"{row['experiment']} seed {row['seed']}{' (float32 forced)' if row['float32_forced'] else ''}"


def table_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(result, targets):
    """The whole report as markdown: it is also what the benchmark prints."""
    m = result["machine"]
    lines = [
        f"# Training benchmark: `{result['experiment']}`",
        "",
        f"CPU: {m['cpu_model']} ({m['cpus']} cores, torch {m['torch_threads']} threads); "
        f"load average before/after {m['load_before']} / {m['load_after']}",
    ]
    p = result.get("pipeline")
    if p:
        header = ["run", "precision", *(title for _, title, _ in COLUMNS)]
        lines += ["", "## Capture + train + evaluate (wall clock; one capture shared by every run)", ""]
        lines += [table_row(header), table_row(["---"] * len(header))]
        for r in p["runs"]:
            cells = (format(r[k], f) for k, _, f in COLUMNS)
            lines.append(table_row([run_name(r), r["precision"], *cells]))
        seeds = p["seeds"]
        for stat in ("min", "median", "max"):
            cells = (format(p["spread"][k][stat], f) for k, _, f in COLUMNS)
            lines.append(table_row([f"**{stat}** over seeds {seeds}", p["precision"], *cells]))
        cpu = [f"{run_name(r)}: {r['total_cpu_s']:.0f}" for r in p["runs"]]
        lines += ["", f"CPU seconds (all cores, capture + train + evaluate): {', '.join(cpu)}."]
    t = result["throughput"]
    lines += [
        "",
        "## Training loop, loader and machine use (same model, data, batch size and precision)",
        "",
        f"{t['rounds']} rounds of {t['steps_per_round']} batches of {t['batch_size']}, ratios of the totals:",
        "",
        f"- bare PyTorch loop: {t['bare_images']} images in {t['bare_seconds']:.2f} s = {t['bare_images_per_s']:.0f} images/s",
        f"- our training loop: {t['ours_images']} images in {t['ours_seconds']:.2f} s = {t['ours_images_per_s']:.0f} images/s, "
        f"ratio {t['loop_ratio']:.3f} (target >= {targets.loop_ratio})",
        f"- DataLoader alone: {t['loader_images']} images in {t['loader_seconds']:.2f} s = {t['loader_images_per_s']:.0f} images/s, "
        f"{t['loader_ratio']:.1f}x what training consumes (target >= {targets.loader_ratio}x)",
        f"- training in {t['precision']}: {t['flops_per_image'] / 1e6:.1f} MFLOP per image (forward + backward) x "
        f"{t['ours_images_per_s']:.0f} images/s = {t['achieved_flop_per_s'] / 1e9:.3g} GFLOP/s",
        f"- {t['torch_threads']}-thread matmul peak ({t['gemm_size']}^3): bfloat16 "
        f"{t['gemm_peak_bfloat16_flop_per_s'] / 1e9:.3g} GFLOP/s, float32 {t['gemm_peak_float32_flop_per_s'] / 1e9:.3g} GFLOP/s; "
        f"training uses {t['fraction_of_bfloat16_peak']:.0%} of the bfloat16 peak, {t['fraction_of_float32_peak']:.0%} of the float32 one",
        "",
        "## Checks",
        "",
        *(f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def benchmark(cfg, experiment="default", passthrough=()):
    """Run the benchmark for `experiment` (the config `cfg` was composed with); returns what it writes."""
    b = cfg.training.benchmark
    result = {"experiment": experiment,
              "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                          "torch_threads": cfg.training.threads or torch.get_num_threads(),
                          "load_before": [round(x, 2) for x in os.getloadavg()]}}  # fmt: skip
    if b.pipeline:
        rows, data_root = pipeline(cfg, experiment, list(passthrough))
        seeds = seed_rows(rows, experiment)
        result["pipeline"] = {"runs": rows, "seeds": [r["seed"] for r in seeds], "precision": seeds[0]["precision"],
                              "spread": spread(seeds)}  # fmt: skip
        with open_dict(cfg):
            cfg.data.root = str(data_root)
    print("training loop, loader and machine use ...", flush=True)
    result["throughput"] = throughput(cfg)
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = dict(b.targets)
    result["checks"] = checks(result, b.targets, experiment)
    report = markdown(result, b.targets)
    publish(cfg, "benchmark", result, report)
    return result


def publish(cfg, stem, result, report):
    """<paths.training>/<stem>.json and .md (atomic), and the report on stdout."""
    write_json(Path(cfg.paths.training) / f"{stem}.json", result)
    write_text(Path(cfg.paths.training) / f"{stem}.md", report)
    print("\n" + report)


def run_cli(cfg, run, own):
    """`run(cfg, experiment, passthrough)` for a benchmark's command line: its overrides go to every pipeline
    command except those starting with one of `own` (the benchmark sets them itself); bad input exits 1
    with one message."""
    passthrough = [o for o in HydraConfig.get().overrides.task if not o.startswith(own)]
    try:
        run(cfg, tracking.experiment_name(cfg), passthrough)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    run_cli(cfg, benchmark, own=("experiment=", "paths.root=", "training.benchmark.", "data.root=", "seed="))


if __name__ == "__main__":
    main()
