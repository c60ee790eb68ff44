"""One BOP results CSV for all objects of a test split, from per-object evaluations (`make bop-results`).

The example trains one network per object (data.obj_id), as CDPN and GDR-Net do on BOP. Train and evaluate
each object into its own folder, then merge:

    for k in 1 2 3; do make train evaluate OVERRIDES="data=scenes data.obj_id=$k paths.training=3_training/obj_00000$k"; done
    make bop-results OVERRIDES="data=scenes"

Reads every `<paths.training>/obj_*/` (or the folders listed in data.bop_results.folders): each one's
metrics.json, errors.csv, predictions.csv and evaluation_info.json (pose/evaluation.py writes them), and
writes, atomically, into `<paths.training>/bop/`:

    <method>_<dataset>-<split>.csv   every object's estimates in the BOP results format (scene_id, im_id,
                      obj_id, score, R, t, time; bop_toolkit's inout.load_bop_results reads it, and
                      scripts/eval_bop19_pose.py scores it: its name says method, dataset and split). time is
                      the image's: the sum of every object's network time on the image, the same in all
                      the image's rows (the challenge's rule). A split folder `test_primesense` is written
                      `test-primesense` (BOP's split type).
    bop_metrics.json  {method, dataset, split, root, detections, objects: {obj_id: that object's metrics.json},
                      pooled: the metrics over all instances of all objects (pose/metrics.py summarize over
                      every errors.csv row, the misses of every object counted), mean_over_objects: each
                      metric averaged over the objects (n_* summed)}
    bop_metrics.md    the same as a table: one row per object, then pooled and mean over objects

Clear errors for a folder without an evaluation, two folders of one object, folders evaluated on other
datasets, splits or detection files, and objects annotated in the split without a folder (unless
data.bop_results.require_all=false).
"""

import csv
import json
import re
import sys
from pathlib import Path

import hydra
import numpy as np

from ..data import bop
from ..files import write_json, write_text
from ..paths import CONFIG_DIR
from .evaluation import PREDICTIONS_COLUMNS, format_floats, image_times, summarize, write_csv

FILES = ("evaluation_info.json", "metrics.json", "errors.csv", "predictions.csv")
SAME = ("root", "split", "detections")  # what every folder must share
TABLE_KEYS = (
    "n_test",
    "n_estimated",
    "re_deg_median",
    "te_cm_median",
    "add_s_01d",
    "adds_auc",
    "acc_5deg5cm",
)
EXAMPLE = 'make train evaluate OVERRIDES="data.obj_id=K paths.training=3_training/obj_00000K"'


def read_bop_results(path):
    """Rows of a BOP results CSV as bop_toolkit's inout.load_bop_results reads them: header skipped, 7
    comma-separated fields, R 3x3 and t 3x1 from space-separated floats; a clear error naming the line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if number == 1 and ",".join(PREDICTIONS_COLUMNS) in line:
                continue
            fields = line.rstrip("\n").split(",")
            try:
                if len(fields) != 7:
                    raise ValueError(f"{len(fields)} comma-separated fields, not 7")
                rows.append({
                    "scene_id": int(fields[0]), "im_id": int(fields[1]), "obj_id": int(fields[2]),
                    "score": float(fields[3]), "R": np.array(fields[4].split(), float).reshape(3, 3),
                    "t": np.array(fields[5].split(), float).reshape(3, 1), "time": float(fields[6]),
                })  # fmt: skip
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not a BOP results row ({error})") from error
    return rows


def read_folder(folder):
    """One object's evaluation: {info, metrics, errors (rows), predictions (rows), folder}."""
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no per-object evaluation ({', '.join(missing)} missing); evaluate the object into "
            f"it first: {EXAMPLE}"
        )
    with open(folder / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    out = {
        "folder": folder,
        "info": json.loads((folder / "evaluation_info.json").read_text()),
        "metrics": json.loads((folder / "metrics.json").read_text()),
        "errors": errors,
        "predictions": read_bop_results(folder / "predictions.csv"),
    }
    obj_id = out["info"]["obj_id"]
    others = {r["obj_id"] for r in out["predictions"]} | {int(r["obj_id"]) for r in errors}
    if others - {obj_id}:
        raise ValueError(
            f"{folder}: evaluation_info.json says obj_id {obj_id}, the CSVs hold {sorted(others)}"
        )
    return out


def check_consistent(runs):
    """One evaluation per object, all of one dataset, split and detections file."""
    seen = {}
    for run in runs:
        obj_id = run["info"]["obj_id"]
        if obj_id in seen:
            raise ValueError(f"obj_id {obj_id} is evaluated twice: in {seen[obj_id]} and in {run['folder']}")
        seen[obj_id] = run["folder"]
        for key in SAME:
            if run["info"][key] != runs[0]["info"][key]:
                raise ValueError(
                    f"{run['folder']} was evaluated with {key} {run['info'][key]!r}, {runs[0]['folder']} with "
                    f"{runs[0]['info'][key]!r}: merge evaluations of one dataset, split and detections file"
                )


def annotated_objects(root, split):
    """obj_ids with at least one annotation in the split's scene_gt.json files."""
    return sorted({rec["obj_id"] for scene in bop.split_scenes(root, split)
                   for recs in bop.read_scene(scene)[0].values() for rec in recs})  # fmt: skip


def merged_rows(runs):
    """Every object's estimates, sorted by (scene_id, im_id, obj_id), with the image's total time."""
    # each object's predictions.csv holds one time per image (its network's): the image's is their sum
    per_object = [{(r["scene_id"], r["im_id"]): r["time"] for r in run["predictions"]} for run in runs]
    times = image_times(
        (scene, image, seconds) for own in per_object for (scene, image), seconds in own.items()
    )
    rows = [r for run in runs for r in run["predictions"]]
    rows.sort(key=lambda r: (r["scene_id"], r["im_id"], r["obj_id"]))
    return [[r["scene_id"], r["im_id"], r["obj_id"], f"{r['score']:g}", format_floats(r["R"]), format_floats(r["t"]),
             f"{times[(r['scene_id'], r['im_id'])]:.6g}"]
            for r in rows]  # fmt: skip


def overall(runs):
    """(pooled, mean_over_objects): the metrics over every instance of every object, and averaged."""
    n_missed = sum(len(run["info"]["missed"]) for run in runs)
    errors = [row for run in runs for row in run["errors"]]
    pooled = summarize(errors, n_missed, runs[0]["info"]["detections"] is not None)
    mean = {}
    for key in pooled:
        values = [run["metrics"][key] for run in runs]
        mean[key] = int(sum(values)) if key.startswith("n_") else float(np.mean(values))
    return pooled, mean


def table(per_object, pooled, mean):
    keys = [k for k in (*TABLE_KEYS, "detection_recall") if k in pooled]
    lines = ["| objects | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]

    def row(name, values):
        cells = [str(values[k]) if k.startswith("n_") else f"{values[k]:.4g}" for k in keys]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines += [row(f"obj {obj_id}", values) for obj_id, values in per_object.items()]
    lines += [row("**pooled** (all instances)", pooled), row("**mean** over objects", mean)]
    return "\n".join(lines) + "\n"


def results_name(method, dataset, split):
    """`<method>_<dataset>-<split>.csv`, the name bop_toolkit parses (split on `_`, then on `-`)."""
    for what, value, bad in (("method", method, "_"), ("dataset", dataset, "_-")):
        if not value or any(c in str(value) for c in bad) or not re.fullmatch(r"[\w.-]+", str(value)):
            raise ValueError(f"data.bop_results.{what}={value!r}: BOP file names need one without {bad!r}")
    return f"{method}_{dataset}-{str(split).replace('_', '-')}.csv"


def merge(folders, out_dir, method, dataset=None, require_all=True):
    """Merge per-object evaluation folders into out_dir (see the module docstring); returns bop_metrics."""
    if not folders:
        raise FileNotFoundError(f"no per-object evaluation folders to merge; make one per object: {EXAMPLE}")
    runs = sorted((read_folder(f) for f in folders), key=lambda run: run["info"]["obj_id"])
    check_consistent(runs)
    root, split = Path(runs[0]["info"]["root"]), runs[0]["info"]["split"]
    missing = sorted(set(annotated_objects(root, split)) - {run["info"]["obj_id"] for run in runs})
    if missing and require_all:
        raise ValueError(
            f"objects {missing} are annotated in {root / split} but have no evaluation among "
            f"{[str(f) for f in folders]}: {EXAMPLE} for each (or data.bop_results.require_all=false)"
        )
    name = results_name(method, dataset or root.name, split)
    per_object = {run["info"]["obj_id"]: run["metrics"] for run in runs}
    pooled, mean = overall(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / name, PREDICTIONS_COLUMNS, merged_rows(runs))
    summary = {
        "method": method, "dataset": dataset or root.name, "split": split, "root": str(root),
        "detections": runs[0]["info"]["detections"], "results": name,
        "folders": {obj_id: str(run["folder"]) for obj_id, run in zip(per_object, runs, strict=True)},
        "objects": per_object, "pooled": pooled, "mean_over_objects": mean,
    }  # fmt: skip
    write_text(out_dir / "bop_metrics.md", table(per_object, pooled, mean))
    write_json(out_dir / "bop_metrics.json", summary)
    return summary


def folders_from_config(cfg):
    listed = (cfg.data.get("bop_results") or {}).get("folders")
    if listed:
        return [Path(f) for f in listed]
    return sorted(p for p in Path(cfg.paths.training).glob("obj_*") if p.is_dir())


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    options = cfg.data.get("bop_results") or {}
    out_dir = Path(cfg.paths.training) / "bop"
    try:
        summary = merge(folders_from_config(cfg), out_dir, options.get("method", "ours"), options.get("dataset"),
                        bool(options.get("require_all", True)))  # fmt: skip
    except (ValueError, FileNotFoundError, KeyError, bop.BopFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print((out_dir / "bop_metrics.md").read_text())
    print(f"wrote {out_dir / summary['results']} ({len(summary['objects'])} objects), bop_metrics.json, .md")


if __name__ == "__main__":
    main()
