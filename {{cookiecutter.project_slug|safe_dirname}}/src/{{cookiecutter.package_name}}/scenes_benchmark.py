"""Stage 3 benchmark on full-frame scenes: the crop pipeline next to the whole-frame resize and the
object-centred default, at one training budget. Prints a table, writes `3_training/scenes_benchmark.json`
and `scenes_benchmark.md`.

    python -m <package>.scenes_benchmark                                    # make scenes-benchmark
    python -m <package>.scenes_benchmark training.benchmark.scenes.num_scenes.train=100   # a bigger budget
    python -m <package>.scenes_benchmark experiment=smoke training.benchmark.scenes.num_scenes.train=2
                                                                            # a quick check (~2 min)

One scene capture (`data=scenes`, sized by `training.benchmark.scenes`: frame size, scenes per split,
frames per scene; the test scenes are held out) feeds three rows, each trained on the `train_pbr` scenes
and tested on the held-out ones:

1. crop, GT boxes: `data.input=crop` (zoom-in crops around each instance's box, data/crop.py);
2. crop, detections: the same checkpoint evaluated on the capture's noisy detections file
   (`data.crop.detections=<root>/detections/<test split>.json`);
3. whole frame: `data.input=frame`, each frame resized to `data.image_size` squared (squashed, K scaled per
   axis) on the same frames; a frame holding the object twice gives the network one image with two answers.

A fourth row is the object-centred default (`data=synthetic`, capture.py), captured with as many training
images as the scene capture holds instances of `data.obj_id` (and as many val/test images). Every row
trains the same model and loss (the experiment's) for the same epochs: the same training images x epochs.
Only the translation target differs, as the input requires: crops hide the distance, so data=scenes
trains the depth in focal lengths (centre_focal_depth), the object-centred default its centre_depth.
Each run is a separate command as `make capture train evaluate` runs it, timed by the wall clock, under
`3_training/scenes_benchmark/<row>/`. `training.benchmark.scenes.data_root` reuses a scene capture made
before (`make capture OVERRIDES=data=scenes`) instead of capturing one (its capture time then reads 0).
"""

import csv
import os
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import ListConfig, OmegaConf

from .benchmark import cpu_model, publish, run_cli, run_command, table_row
from .data.bop import dataset_from_config
from .paths import CONFIG_DIR

# (key, column title, format) of each row's figures
COLUMNS = [
    ("train_images", "train images", "d"),
    ("epochs", "epochs", "d"),
    ("capture_s", "capture s", ".0f"),
    ("train_s", "train s", ".0f"),
    ("evaluate_s", "eval s", ".0f"),
    ("re_deg_median", "rot. err. median °", ".2f"),
    ("te_cm_median", "transl. err. median cm", ".3f"),
    ("distance_cm_median", "distance median cm", ".1f"),
    ("te_rel_median", "transl. err. / distance median", ".4f"),
    ("add_s_01d", "ADD(-S) < 0.1 d", ".3f"),
    ("acc_5deg5cm", "5°5cm", ".3f"),
    ("n_test", "test instances", "d"),
    ("detection_recall", "detection recall", ".3f"),
]
# overrides the benchmark sets per run: from the command line they would make the rows alike
OWN = ("data=", "data.root=", "data.preload=", "data.input=", "data.crop.detections=", "data.capture.num_images.",
       "data.scenes.image_size=", "data.scenes.num_scenes", "data.scenes.images_per_scene=", "training.epochs=",
       "training.checkpoint_dir=")  # fmt: skip


def check_budget(s):
    """training.benchmark.scenes: a clear error naming the key that is wrong."""
    key = "training.benchmark.scenes"
    size = s.get("image_size")
    if not (
        isinstance(size, ListConfig | list)
        and len(size) == 2
        and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"{key}.image_size must be [width, height] in pixels, e.g. [640, 480] (got {size})")
    for split in ("train", "val", "test"):
        n = s.num_scenes.get(split)
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{key}.num_scenes.{split} must be an integer >= 1 (got {n})")
    for name in ("images_per_scene", "epochs"):
        if not (isinstance(s.get(name), int) and s.get(name) >= 1):
            raise ValueError(f"{key}.{name} must be an integer >= 1 (got {s.get(name)})")


def check_passthrough(passthrough):
    clashing = [o for o in passthrough if o.lstrip("+~").startswith(OWN)]
    if clashing:
        raise ValueError(
            f"{' '.join(clashing)}: the scenes benchmark sets these per run (data, input, boxes, budget); "
            "size the budget with training.benchmark.scenes.* instead"
        )


def split_sizes(run_cfg):
    """{split: instances of data.obj_id the run's data config reads} (what training and testing see)."""
    data = OmegaConf.create(OmegaConf.to_container(run_cfg.data, resolve=True))
    data.preload = False  # counting only
    return {s: len(dataset_from_config(data, data.splits[s], role="val")) for s in ("train", "val", "test")}


def distance_figures(errors_csv):
    """Medians of the camera-to-object distance and of the translation error relative to it, from
    evaluation's errors.csv. The scene capture puts objects 400-900 mm away, the object-centred one
    180-300 mm: a depth read from the apparent size errs in proportion to the distance, so the relative
    error compares the pipelines where centimetres cannot. (evaluation.py writes no errors.csv without rows.)"""
    with open(errors_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    distance_mm = np.array([np.linalg.norm(np.array(r["t_gt"].split(), dtype=float)) for r in rows])
    te_mm = np.array([float(r["te_cm"]) * 10.0 for r in rows])
    return {
        "distance_cm_median": float(np.median(distance_mm) / 10.0),
        "te_rel_median": float(np.median(te_mm / distance_mm)),
    }


def run(root, args, shared_capture=None, trained_checkpoints=None):
    """Capture (unless `shared_capture`: (seconds, data root) of a capture already made), train (unless
    `trained_checkpoints`: the checkpoint folder of a row already trained), evaluate. Returns the row's
    figures, its checkpoint folder and the config it was trained with."""
    root.mkdir(parents=True, exist_ok=True)
    args = [*args, f"paths.root={root}"]
    if shared_capture is None:
        capture_s, _ = run_command("data.capture", args, root / "capture.log")
        data_root = root / "2_data" / "dataset"
    else:
        capture_s, data_root = shared_capture
    args = [*args, f"data.root={data_root}"]
    train_s, checkpoints = 0.0, trained_checkpoints or root / "3_training" / "checkpoints"
    if trained_checkpoints is None:
        train_s, _ = run_command("training", [*args, "training.progress=false"], root / "train.log")
    evaluate_s, _ = run_command(
        "evaluation", [*args, f"training.checkpoint_dir={checkpoints}"], root / "evaluate.log"
    )
    metrics = OmegaConf.to_container(OmegaConf.load(root / "3_training" / "metrics.json"))
    trained = OmegaConf.create(torch.load(checkpoints / "last.pt", weights_only=True)["config"])
    row = {
        "data": trained.data.name, "input": trained.data.input, "translation": trained.loss.translation,
        "detections": None,
        "train_images": split_sizes(trained)["train"], "epochs": int(trained.training.epochs),
        "capture_s": capture_s, "train_s": train_s, "evaluate_s": evaluate_s, "data_root": str(data_root),
        **{k: metrics[k] for k, _, _ in COLUMNS if k in metrics},
        **distance_figures(root / "3_training" / "errors.csv"),
    }  # fmt: skip
    return row, checkpoints, trained


def rows(cfg, experiment, passthrough):
    """The rows in the table's order; each run lives in 3_training/scenes_benchmark/<row>/."""
    s = cfg.training.benchmark.scenes
    bench = Path(cfg.paths.training) / "scenes_benchmark"
    common = [f"experiment={experiment}", *passthrough, f"training.epochs={s.epochs}"]
    w, h = s.image_size
    scenes = [*common, "data=scenes", f"data.scenes.image_size=[{w},{h}]",
              f"data.scenes.images_per_scene={s.images_per_scene}", f"data.preload={str(bool(s.preload)).lower()}",
              *(f"data.scenes.num_scenes.{k}={s.num_scenes[k]}" for k in ("train", "val", "test"))]  # fmt: skip
    given = (0.0, Path(s.data_root).resolve()) if s.get("data_root") else None
    print(f"[crop, GT boxes] {'capture scenes, ' if given is None else ''}train, evaluate ...", flush=True)
    crop, checkpoints, trained = run(bench / "crop", [*scenes, "data.input=crop"], shared_capture=given)
    shared = (crop["capture_s"], Path(crop["data_root"]))
    detections = shared[1] / "detections" / f"{trained.data.splits.test}.json"
    print("[crop, detections] evaluate ...", flush=True)
    det, _, _ = run(bench / "crop_detections", [*scenes, "data.input=crop", f"data.crop.detections={detections}"],
                    shared_capture=shared, trained_checkpoints=checkpoints)  # fmt: skip
    print("[whole frame] train, evaluate ...", flush=True)
    frame, _, _ = run(bench / "frame", [*scenes, "data.input=frame"], shared_capture=shared)
    out = [{"row": "crop, GT boxes", **crop}, {"row": "crop, detections", **det, "detections": str(detections)},
           {"row": "whole frame resized", **frame}]  # fmt: skip
    if s.default:
        sizes = split_sizes(trained)
        print(f"[object-centred] capture {sizes['train']}/{sizes['val']}/{sizes['test']} images, train, evaluate ...",
              flush=True)  # fmt: skip
        counts = [f"data.capture.num_images.{k}={max(n, 1)}" for k, n in sizes.items()]
        default, _, _ = run(bench / "object_centred", [*common, "data=synthetic", *counts])
        out.append({"row": "object-centred default", **default})
    return out


def scene_capture(budget):
    if budget.get("data_root"):
        return f"Scene capture: {budget['data_root']} (given); the test scenes are held out."
    w, h = budget["image_size"]
    return (f"Scene capture: {w}x{h} frames, scenes {budget['num_scenes']} x {budget['images_per_scene']} frames; "
            "the test scenes are held out.")  # fmt: skip


def markdown(result):
    m = result["machine"]
    header = [
        "pipeline",
        "data",
        "data.input",
        "translation target",
        "test boxes",
        *(title for _, title, _ in COLUMNS),
    ]
    lines = [
        f"# Scene benchmark: `{result['experiment']}`",
        "",
        f"CPU: {m['cpu_model']} ({m['cpus']} cores); load average before/after {m['load_before']} / {m['load_after']}",
        scene_capture(result["budget"]),
        "",
        table_row(header),
        table_row(["---"] * len(header)),
    ]  # fmt: skip
    for r in result["rows"]:
        boxes = "detections" if r["detections"] else ("GT" if r["input"] == "crop" else "-")
        cells = ("-" if r.get(k) is None else format(r[k], f) for k, _, f in COLUMNS)
        lines.append(table_row([r["row"], r["data"], r["input"], r["translation"], boxes, *cells]))
    lines += [
        "",
        "The three scene rows share one capture (its time is repeated in each); the detections row "
        "reuses the crop row's checkpoint (no training of its own).",
    ]
    ratios = result.get("ratio_to_default")
    if ratios:
        lines += ["", "Median errors relative to the object-centred default (issue 12's target: <= 1.5):", ""]
        lines += [
            f"- {name}: rotation {q['re']:.2f}x, translation {q['te']:.2f}x, translation / distance "
            + ("-" if q["te_rel"] is None else f"{q['te_rel']:.2f}x")
            for name, q in ratios.items()
        ]
    return "\n".join(lines) + "\n"


def benchmark(cfg, experiment="default", passthrough=()):
    check_budget(cfg.training.benchmark.scenes)
    root = cfg.training.benchmark.scenes.get("data_root")
    if root and not (Path(root) / "detections").is_dir():
        raise FileNotFoundError(
            f"training.benchmark.scenes.data_root={root}: not a scene capture (no detections/ folder); "
            "null captures one"
        )
    check_passthrough(list(passthrough))
    result = {"experiment": experiment, "budget": OmegaConf.to_container(cfg.training.benchmark.scenes),
              "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                          "load_before": [round(x, 2) for x in os.getloadavg()]}}  # fmt: skip
    result["rows"] = rows(cfg, experiment, list(passthrough))
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    by_name = {r["row"]: r for r in result["rows"]}
    default = by_name.get("object-centred default")
    if default and default["re_deg_median"] and default["te_cm_median"]:
        result["ratio_to_default"] = {
            r["row"]: {"re": r["re_deg_median"] / default["re_deg_median"], "te": r["te_cm_median"] / default["te_cm_median"],
                       "te_rel": r["te_rel_median"] / default["te_rel_median"] if default["te_rel_median"] else None}
            for r in result["rows"] if r is not default
        }  # fmt: skip
    report = markdown(result)
    publish(cfg, "scenes_benchmark", result, report)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    # the command line's overrides go to every run, except the benchmark's own (OWN: an error)
    run_cli(cfg, benchmark, own=("experiment=", "paths.root=", "training.benchmark."))


if __name__ == "__main__":
    main()
