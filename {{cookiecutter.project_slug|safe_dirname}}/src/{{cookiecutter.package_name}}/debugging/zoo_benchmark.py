"""Benchmark the doctor on the bug zoo: injected cause vs top-1 diagnosis, false alarms on healthy configs.

    python -m <package>.debugging.zoo_benchmark                 # make doctor-benchmark
    python -m <package>.debugging.zoo_benchmark benchmark.jobs=2                 # two doctors side by side
    python -m <package>.debugging.zoo_benchmark benchmark.parts=[zoo_test]       # the held-out part only
    python -m <package>.debugging.zoo_benchmark benchmark.configs=[lr_too_high,zoo_test/healthy_quaternion]
    python -m <package>.debugging.zoo_benchmark benchmark.first_seed=2           # seeds 2, 3 (healthy: 2, 3, 4)

The zoo has two parts: the development part (configs/experiment/zoo), which the doctor's rules and thresholds
were chosen by looking at, and the held-out test part (configs/experiment/zoo_test), which they were not.
Every <part>/<name>.yaml is diagnosed by the doctor; the injected cause is the file name (`healthy*` = no
cause; `<cause>_<variant>` = <cause>). Healthy configs run with `benchmark.seeds` seeds (`benchmark.first_seed`,
default 0, and the next ones), the faulty ones with `benchmark.faulty_seeds`. `benchmark.jobs` doctors run
side by side, each in its own process (on `debugging.doctor.threads` torch threads); the table keeps the
configs' order. Prints, per part, the confusion table, top-1 accuracy over the faulty runs, false alarms on
the healthy ones and the wall time per run, and writes 4_debugging/doctor/benchmark.json and benchmark.md. Timings and verdicts depend on the machine,
the precision and how many doctors share it: both files record these conditions (CPU, precision, jobs, times).
"""

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from ..benchmark import cpu_model
from ..checkpoints import pick_device
from ..files import write_json, write_text
from ..loop_benchmark import precision
from ..paths import CONFIG_DIR
from . import doctor

PARTS = {"zoo": "development", "zoo_test": "test (held out)"}


def zoo_names(config_dir=CONFIG_DIR, part="zoo"):
    """The configs of one part, as `<name>` for the development part and `<part>/<name>` for the others."""
    if part not in PARTS:
        raise ValueError(f"benchmark.parts: '{part}' is not a part of the zoo ({', '.join(PARTS)})")
    folder = Path(config_dir) / "experiment" / part
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the bug zoo's configs are missing")
    return sorted(canonical(f"{part}/{p.stem}") for p in folder.glob("*.yaml"))


def split_name(name):
    """'zoo_test/lr_too_high_0p3' -> ('zoo_test', 'lr_too_high_0p3'); a bare name is the development part's."""
    part, _, stem = name.rpartition("/")
    part = part or "zoo"
    if part not in PARTS:
        raise ValueError(f"benchmark.configs: '{name}' is in no part of the zoo ({', '.join(PARTS)})")
    return part, stem


def injected_cause(name):
    part, name = split_name(name)
    if name.startswith("healthy"):
        return "none"
    matches = [c for c in doctor.CAUSES if name == c or name.startswith(c + "_")]
    if not matches:
        raise ValueError(
            f"configs/experiment/{part}/{name}.yaml: the name must start with a cause id or 'healthy'"
        )
    return max(matches, key=len)


def plan(names, seeds, faulty_seeds, first_seed=0):
    """(config, seed, label) for every doctor run, in the table's order; seeds first_seed, first_seed + 1, ...
    A label (the report's folder) names its seed, except a faulty config's only run on seed 0."""
    runs = []
    for name in names:
        healthy = injected_cause(name) == "none"
        count = seeds if healthy else faulty_seeds
        runs += [
            (name, seed, name if count == 1 and seed == 0 and not healthy else f"{name}/seed{seed}")
            for seed in range(first_seed, first_seed + count)
        ]
    return runs


def canonical(name):
    """How the table names a config: `<name>` in the development part, `<part>/<name>` in the others."""
    part, stem = split_name(name)
    return stem if part == "zoo" else f"{part}/{stem}"


def experiment(name):
    """The experiment a config name selects: `zoo/<name>` or `zoo_test/<name>`."""
    return "/".join(split_name(name))


def report_folder(label):
    """The doctor's report folder for a run label (a config name, maybe with /seed<n>): under `zoo/` or its part."""
    return label if label.split("/")[0] in PARTS else f"zoo/{label}"


def diagnose(name, seed, label, overrides, verbose):
    """One doctor run -> its table row. A crash is a row too: one broken config must not hide the others."""
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose("config", overrides=[f"experiment={experiment(name)}", f"seed={seed}", *overrides])
    with open_dict(config):
        config.debugging.doctor.verbose = verbose
    start = time.perf_counter()
    try:
        top, error = doctor.run_doctor(config, name=report_folder(label))["top_cause"], None
    except Exception as exc:
        top, error = "error", f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    expected = injected_cause(name)
    row = {"config": name, "part": split_name(name)[0], "seed": seed, "injected": expected, "diagnosed": top, "correct": top == expected,
           "seconds": round(seconds, 1), "error": error}  # fmt: skip
    print(f"{label:40s} injected {expected:24s} diagnosed {top:24s} {seconds:6.1f} s", flush=True)
    return row


def _exit_with_parent(parent):
    """Worker initializer: leave when the benchmark process dies (a killed parent would otherwise leave its
    workers finishing their doctor runs, several minutes of CPU each, with nobody to read the result)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _diagnose_in_worker(args):
    GlobalHydra.instance().clear()
    return diagnose(*args)


def settings(bench):
    """The benchmark's counts, defaults filled in and checked: (seeds, faulty_seeds, jobs, first_seed)."""
    seeds, faulty_seeds, jobs, first_seed = (
        int(bench.get(k, d)) for k, d in (("seeds", 3), ("faulty_seeds", 2), ("jobs", 1), ("first_seed", 0))
    )
    if min(seeds, faulty_seeds, jobs) < 1:
        raise ValueError(
            f"benchmark.seeds, benchmark.faulty_seeds and benchmark.jobs must be >= 1 (got {seeds}, {faulty_seeds}, {jobs})"
        )
    if first_seed < 0:
        raise ValueError(f"benchmark.first_seed must be >= 0 (got {first_seed})")
    return seeds, faulty_seeds, jobs, first_seed


def run(cfg, overrides):
    bench = cfg.get("benchmark") or {}
    parts = list(bench.get("parts") or PARTS)
    names = [canonical(n) for n in bench.get("configs") or [n for p in parts for n in zoo_names(part=p)]]
    for name in names:
        injected_cause(name)  # a bad name fails before any doctor runs
    seeds, faulty_seeds, jobs, first_seed = settings(bench)
    verbose = bool(bench.get("verbose", False))
    work = [
        (name, seed, label, list(overrides), verbose)
        for name, seed, label in plan(names, seeds, faulty_seeds, first_seed)
    ]
    if jobs == 1:
        GlobalHydra.instance().clear()
        return [diagnose(*args) for args in work]
    # spawn, not fork: each doctor starts with fresh torch threads and no state copied from this process
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        return list(pool.map(_diagnose_in_worker, work))


def summarize(rows):
    faulty = [r for r in rows if r["injected"] != "none"]
    healthy = [r for r in rows if r["injected"] == "none"]
    correct = sum(r["correct"] for r in faulty)
    alarms = [r for r in healthy if r["diagnosed"] != "none"]
    labels = sorted({r["injected"] for r in rows} | {r["diagnosed"] for r in rows})
    confusion = {
        a: {b: sum(1 for r in rows if r["injected"] == a and r["diagnosed"] == b) for b in labels}
        for a in sorted({r["injected"] for r in rows})
    }
    return {
        "top1_accuracy": correct / len(faulty) if faulty else None,
        "correct": correct,
        "faulty_configs": len(faulty),
        "false_alarms": len(alarms),
        "healthy_runs": len(healthy),
        "confusion": confusion,
        "rows": rows,
        "seconds_total": round(sum(r["seconds"] for r in rows), 1),
        "seconds_max": max((r["seconds"] for r in rows), default=0.0),
    }


def summarize_parts(rows):
    """{part: summarize(its rows)} for the parts that ran, development first: the two are never pooled."""
    return {
        part: summarize([r for r in rows if r["part"] == part])
        for part in PARTS
        if any(r["part"] == part for r in rows)
    }


def markdown(summary, title="Doctor benchmark on the bug zoo", level=1):
    lines = [
        f"{'#' * level} {title}",
        "",
        f"Top-1 accuracy on faulty runs: **{summary['correct']}/{summary['faulty_configs']}"
        + (f" = {summary['top1_accuracy']:.0%}**" if summary["top1_accuracy"] is not None else "**"),
        f"False alarms on healthy runs: **{summary['false_alarms']}/{summary['healthy_runs']}**",
        f"Wall time: {summary['seconds_total']} s in total, at most {summary['seconds_max']} s per run "
        "(machine-dependent; see the report for the conditions).",
        "",
        "| config | seed | injected | diagnosed | ok | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['config']} | {r['seed']} | `{r['injected']}` | `{r['diagnosed']}` | "
            f"{'yes' if r['correct'] else '**no**'} | {r['seconds']} |"
        )
    labels = sorted({b for row in summary["confusion"].values() for b in row})
    lines += [
        "",
        f"{'#' * (level + 1)} Confusion (rows: injected, columns: diagnosed)",
        "",
        "| injected \\ diagnosed | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for a, row in summary["confusion"].items():
        lines.append(f"| `{a}` | " + " | ".join(str(row[b]) if row[b] else "" for b in labels) + " |")
    return "\n".join(lines) + "\n"


def conditions(cfg, overrides, started):
    """What the numbers depend on besides the code: the machine, the precision of the doctor's runs (bfloat16
    on a CPU with native bf16, else float32: verdicts can differ between the two), the doctors side by side,
    the overrides every doctor ran with, and when."""
    _, _, jobs, first_seed = settings(cfg.get("benchmark") or {})
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "precision": precision(cfg, pick_device(cfg)),
        "jobs": jobs,
        "first_seed": first_seed,
        "torch_threads_per_doctor": int(cfg.debugging.doctor.threads or torch.get_num_threads()),
        "torch": torch.__version__,
        "overrides": list(overrides),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (UTC needs 3.11)
    }


def report(parts, cond=None):
    """The whole benchmark.md: one table per part, the held-out one last."""
    lines = [
        "# Doctor benchmark on the bug zoo",
        "",
        "Development part: configs/experiment/zoo, the faults the doctor's rules and thresholds were chosen by "
        "looking at. Test part: configs/experiment/zoo_test, held out (no rule or threshold was chosen by "
        "looking at it); its score is the one that says how the doctor does on faults it has not seen.",
    ]
    if cond:
        lines += ["", f"Measured on {cond['cpu_model']} ({cond['cpus']} cores; {cond['jobs']} doctor(s) side by side, "
                      f"{cond['torch_threads_per_doctor']} torch thread(s) each) in {cond['precision']}, torch "
                      f"{cond['torch']}, {cond['started']} to {cond['finished']}; seeds from {cond['first_seed']}; "
                      "every doctor's overrides: "
                      f"`{' '.join(cond['overrides']) or 'none'}`."]  # fmt: skip
    for part, summary in parts.items():
        title = f"{PARTS[part].capitalize()} part: configs/experiment/{part}"
        lines += ["", markdown(summary, title=title, level=2).rstrip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    overrides = list(sys.argv[1:] if argv is None else argv)
    bench_overrides = [o for o in overrides if o.startswith("benchmark.")]
    overrides = [o for o in overrides if not o.startswith("benchmark.")]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (UTC needs 3.11)
    try:
        GlobalHydra.instance().clear()
        with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            base = compose("config", overrides=overrides)
        bench = OmegaConf.from_dotlist(bench_overrides).get("benchmark") or {}
        with open_dict(base):
            base.benchmark = bench
        rows = run(base, overrides)
        parts = summarize_parts(rows)
        cond = conditions(base, overrides, started)
        out = Path(base.debugging.doctor.output)
        write_json(out / "benchmark.json", {"conditions": cond, "parts": parts})
        write_text(out / "benchmark.md", report(parts, cond))
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(report(parts, cond))
    print(f"written: {out / 'benchmark.md'}, {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
