"""Benchmark the doctor on the bug zoo: injected cause vs top-1 diagnosis, false alarms on healthy configs.

    python -m <package>.debugging.zoo_benchmark                 # make doctor-benchmark
    python -m <package>.debugging.zoo_benchmark benchmark.configs=[lr_too_high,healthy] benchmark.seeds=1

Every configs/experiment/zoo/<name>.yaml is diagnosed by the doctor; the injected cause is the file name
(`healthy*` = no cause; `<cause>_<variant>` = <cause>). Healthy configs run with `benchmark.seeds` seeds
(0, 1, ...), the faulty ones with the first seed. Prints the confusion table, top-1 accuracy over the faulty
configs, false alarms on the healthy ones and the wall time per config, and writes
4_debugging/doctor/benchmark.json and benchmark.md. Timings depend on the machine: report them as measured.
"""

import sys
import time
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from ..files import write_json, write_text
from ..paths import CONFIG_DIR
from . import doctor


def zoo_names(config_dir=CONFIG_DIR):
    folder = Path(config_dir) / "experiment" / "zoo"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the bug zoo's configs are missing")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def injected_cause(name):
    if name.startswith("healthy"):
        return "none"
    matches = [c for c in doctor.CAUSES if name == c or name.startswith(c + "_")]
    if not matches:
        raise ValueError(
            f"configs/experiment/zoo/{name}.yaml: the name must start with a cause id or 'healthy'"
        )
    return max(matches, key=len)


def run(cfg, overrides):
    bench = cfg.get("benchmark") or {}
    names = list(bench.get("configs") or zoo_names())
    seeds = int(bench.get("seeds", 3))
    rows = []
    for name in names:
        expected = injected_cause(name)
        for seed in range(seeds if expected == "none" else 1):
            config = compose("config", overrides=[f"experiment=zoo/{name}", f"seed={seed}", *overrides])
            with open_dict(config):
                config.debugging.doctor.verbose = bool(bench.get("verbose", False))
            label = name if expected != "none" else f"{name}/seed{seed}"
            start = time.perf_counter()
            try:
                result = doctor.run_doctor(config, name=f"zoo/{label}")
                top, error = result["top_cause"], None
            except Exception as exc:  # one broken config must not hide the others' numbers
                top, error = "error", f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "config": name,
                    "seed": seed,
                    "injected": expected,
                    "diagnosed": top,
                    "correct": top == expected,
                    "seconds": round(seconds, 1),
                    "error": error,
                }
            )
            print(f"{label:40s} injected {expected:24s} diagnosed {top:24s} {seconds:6.1f} s", flush=True)
    return rows


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


def markdown(summary):
    lines = [
        "# Doctor benchmark on the bug zoo",
        "",
        f"Top-1 accuracy on faulty configs: **{summary['correct']}/{summary['faulty_configs']}"
        + (f" = {summary['top1_accuracy']:.0%}**" if summary["top1_accuracy"] is not None else "**"),
        f"False alarms on healthy runs: **{summary['false_alarms']}/{summary['healthy_runs']}**",
        f"Wall time: {summary['seconds_total']} s in total, at most {summary['seconds_max']} s per config "
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
        "## Confusion (rows: injected, columns: diagnosed)",
        "",
        "| injected \\ diagnosed | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for a, row in summary["confusion"].items():
        lines.append(f"| `{a}` | " + " | ".join(str(row[b]) if row[b] else "" for b in labels) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    overrides = list(sys.argv[1:] if argv is None else argv)
    bench_overrides = [o for o in overrides if o.startswith("benchmark.")]
    overrides = [o for o in overrides if not o.startswith("benchmark.")]
    try:
        GlobalHydra.instance().clear()
        with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            base = compose("config", overrides=overrides)
            bench = OmegaConf.from_dotlist(bench_overrides).get("benchmark") or {}
            with open_dict(base):
                base.benchmark = bench
            rows = run(base, overrides)
        summary = summarize(rows)
        out = Path(base.debugging.doctor.output)
        write_json(out / "benchmark.json", summary)
        write_text(out / "benchmark.md", markdown(summary))
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(markdown(summary))
    print(f"written: {out / 'benchmark.md'}, {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
