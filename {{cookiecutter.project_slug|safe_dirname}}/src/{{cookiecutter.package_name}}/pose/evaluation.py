"""The pose example's evaluation (PoseTask.evaluate, run by `make evaluate`, evaluation.py): predicts every
test instance of `data.obj_id` in `data.splits.test`; evaluation.py writes metrics.json and errors.csv
(from what this returns), this module the rest, atomically, into 3_training/:

    metrics.json      flat dict, the stable keys (pose/metrics.py defines them; bop_toolkit definitions). The
                      error statistics are over the instances with an estimate; the fractions and AUCs are
                      over ALL annotated test instances: one without an estimate (no detection matched it)
                      is a failure there, as in BOP's recall scores:
                        re_deg_median, re_deg_mean   rotation error, degrees (estimated instances)
                        te_cm_median, te_cm_mean     translation error, cm (estimated instances)
                        add_01d      fraction with ADD < 0.1 * object diameter (all instances, as below)
                        adds_01d     fraction with ADD-S < 0.1 * diameter
                        add_s_01d    fraction with ADD(-S) < 0.1 * diameter (ADD-S for symmetric objects)
                        adds_auc     area under the ADD-S accuracy curve up to 10 cm = mean(max(0, 1 - e / 10 cm))
                        add_s_auc    the same for ADD(-S)
                        acc_5deg5cm  fraction with rotation error < 5 deg and translation error < 5 cm
                        n_test       annotated test instances (of data.obj_id, visible enough)
                        n_estimated  of them with an estimate (n_test unless detections missed some)
                      with data.crop.detections also:
                        detection_recall   n_estimated / n_test
                        <key>_detected     each of add_01d ... acc_5deg5cm over the n_estimated instances
                                     only (the pose estimate's own quality, misses left out)
    errors.csv        one row per estimated test instance: scene_id,im_id,obj_id,gt_id,rgb_path,re_deg,te_cm,add_mm,
                      adds_mm,diameter_mm,symmetric,visib_fract,R_gt,t_gt,R_pred,t_pred,K (K of the frame at
                      rgb_path, whose camera the poses are in; matrices as space-separated row-major floats,
                      mm; symmetric 0/1); `make analyze` reads it
    predictions.csv   BOP results format (bop_toolkit scores it): scene_id,im_id,obj_id,score,R,t,time with
                      R 9 row-major floats, t in mm, time = seconds for the image (BOP: the same for every
                      estimate of an image): the sum of its estimates' shares of their batches' time;
                      score is 1 for every estimate (one estimate per annotated instance, no confidence)
    evaluation_info.json  what was evaluated, for pose/bop_results.py (`make bop-results` merges the
                      per-object folders): root, split, obj_id, detections, n_test and missed (the
                      [scene_id, im_id, gt_id] of the instances without an estimate)
    plots/            DVC plots: accuracy_vs_threshold.csv (threshold_cm, add_s, adds, add: fraction of
                      instances below the threshold), hist_re_deg.csv, hist_te_cm.csv, hist_add_s_rel.csv
                      (ADD(-S) / diameter) with columns <error>, count (bin centres); PNG renderings of
                      them (accuracy_vs_threshold.png, error_histograms.png) and predictions.png, a grid of
                      test images with the true (dark) and predicted (bright) object axes

With `logger=wandb` the metrics go to the run as test/<key>, plus the prediction grid.
"""

import csv
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

from ..data import bop
from ..files import atomic_dir, atomic_path, write_json
from . import draw, metrics

ERRORS_COLUMNS = (
    "scene_id", "im_id", "obj_id", "gt_id", "rgb_path", "re_deg", "te_cm", "add_mm", "adds_mm", "diameter_mm",
    "symmetric", "visib_fract", "R_gt", "t_gt", "R_pred", "t_pred", "K",
)  # fmt: skip
PREDICTIONS_COLUMNS = ("scene_id", "im_id", "obj_id", "score", "R", "t", "time")
THRESHOLDS_CM = np.linspace(0.0, 10.0, 101)


@torch.no_grad()
def predict(estimator, loader, device):
    """Run `estimator(image, K) -> (R, t_mm)` over `loader` (BopDataset batches).

    Returns one dict per instance: the batch's metadata (scene_id, im_id, obj_id, gt_id, rgb_path,
    visib_fract), K (of the frame at rgb_path: the poses are in its camera), K_input (of the network's
    input, the crop in crop mode), R_gt, t_gt, R_pred, t_pred as
    float64 numpy arrays, and time_s, the batch's forward time divided by its size.
    """
    estimator.eval()
    records = []
    for batch in loader:
        images, K = batch["image"].to(device), batch["K"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        R, t = estimator(images, K)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / len(images)
        R, t = R.double().cpu().numpy(), t.double().cpu().numpy()
        for i in range(len(images)):
            records.append(
                {
                    "scene_id": int(batch["scene_id"][i]),
                    "im_id": int(batch["im_id"][i]),
                    "obj_id": int(batch["obj_id"][i]),
                    "gt_id": int(batch["gt_id"][i]),
                    "rgb_path": str(batch["rgb_path"][i]),
                    "visib_fract": float(batch["visib_fract"][i]),
                    "K": batch["K_frame"][i].double().numpy(),
                    "K_input": batch["K"][i].double().numpy(),
                    "R_gt": batch["R"][i].double().numpy(),
                    "t_gt": batch["t"][i].double().numpy(),
                    "R_pred": R[i],
                    "t_pred": t[i],
                    "time_s": seconds,
                }
            )
    if not records:
        raise ValueError("the test loader yielded no instances")
    return records


def add_errors(records, points_mm, diameter_mm, symmetric):
    """Fill each record with re_deg, te_cm, add_mm, adds_mm, diameter_mm and symmetric (in place)."""
    errors = metrics.pose_errors(
        np.stack([r["R_pred"] for r in records]),
        np.stack([r["t_pred"] for r in records]),
        np.stack([r["R_gt"] for r in records]),
        np.stack([r["t_gt"] for r in records]),
        points_mm,
    )
    for i, record in enumerate(records):
        record.update({k: float(v[i]) for k, v in errors.items()})
        record.update(diameter_mm=float(diameter_mm), symmetric=int(bool(symmetric)))
    return records


def format_floats(array):
    return " ".join(f"{x:.9g}" for x in np.asarray(array, dtype=np.float64).reshape(-1))


def summarize(per_sample, n_missed, detections):
    """metrics.json's dict: metrics.summarize with the misses, plus, when a detections file chose the boxes,
    detection_recall and each recall-style key over the detected instances only (`<key>_detected`)."""
    summary = metrics.summarize(per_sample, n_missed=n_missed)
    if detections:
        summary["detection_recall"] = summary["n_estimated"] / summary["n_test"]
        detected = metrics.summarize(per_sample)
        summary.update({f"{k}_detected": detected[k] for k in metrics.RECALL_KEYS})
    return summary


def write_csv(path, columns, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def error_rows(records):
    """errors.csv's rows (ERRORS_COLUMNS, numbers as text: matrices space-separated row-major, mm)."""
    rows = []
    for r in records:
        values = (
            [r["scene_id"], r["im_id"], r["obj_id"], r["gt_id"], r["rgb_path"]]
            + [f"{r[k]:.9g}" for k in ("re_deg", "te_cm", "add_mm", "adds_mm", "diameter_mm")]
            + [r["symmetric"], f"{r['visib_fract']:.9g}"]
            + [format_floats(r[k]) for k in ("R_gt", "t_gt", "R_pred", "t_pred", "K")]
        )
        rows.append(dict(zip(ERRORS_COLUMNS, values, strict=True)))
    return rows


def image_times(keys_and_seconds):
    """{(scene_id, im_id): seconds} summed over (scene_id, im_id, seconds) triples: BOP's `time` is the
    time to estimate every object of an image, the same in each of its rows."""
    times = {}
    for scene_id, im_id, seconds in keys_and_seconds:
        times[(scene_id, im_id)] = times.get((scene_id, im_id), 0.0) + float(seconds)
    return times


def write_predictions_csv(path, records):
    times = image_times((r["scene_id"], r["im_id"], r["time_s"]) for r in records)
    rows = [
        [
            r["scene_id"],
            r["im_id"],
            r["obj_id"],
            1,
            format_floats(r["R_pred"]),
            format_floats(r["t_pred"]),
            f"{times[(r['scene_id'], r['im_id'])]:.6g}",
        ]
        for r in records
    ]
    write_csv(path, PREDICTIONS_COLUMNS, rows)


def histogram_rows(values, bins, upper):
    counts, edges = np.histogram(np.clip(values, 0, upper), bins=bins, range=(0, upper))
    centres = (edges[:-1] + edges[1:]) / 2
    return [[f"{c:.6g}", int(n)] for c, n in zip(centres, counts, strict=True)]


def write_plots(directory, records, grid=None):
    """DVC plot data (CSV) and PNG renderings of it into `directory` (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    re_deg = np.array([r["re_deg"] for r in records])
    te_cm = np.array([r["te_cm"] for r in records])
    add, adds = np.array([r["add_mm"] for r in records]), np.array([r["adds_mm"] for r in records])
    symmetric = np.array([r["symmetric"] for r in records], dtype=bool)
    diameter = np.array([r["diameter_mm"] for r in records])
    add_s = metrics.add_s_mm(add, adds, symmetric)
    curves = {name: metrics.accuracy_curve(e, THRESHOLDS_CM * 10) for name, e in
              (("add_s", add_s), ("adds", adds), ("add", add))}  # fmt: skip
    write_csv(
        directory / "accuracy_vs_threshold.csv",
        ("threshold_cm", "add_s", "adds", "add"),
        [
            [f"{x:.6g}"] + [f"{curves[k][i]:.6g}" for k in ("add_s", "adds", "add")]
            for i, x in enumerate(THRESHOLDS_CM)
        ],
    )
    # Errors beyond the last bin are counted in it, so the histograms keep every instance.
    histograms = {
        "re_deg": (re_deg, 180.0, "rotation error (deg)"),
        "te_cm": (te_cm, max(5.0, float(np.percentile(te_cm, 95))), "translation error (cm)"),
        "add_s_rel": (add_s / diameter, 1.0, "ADD(-S) / diameter"),
    }
    for name, (values, upper, _) in histograms.items():
        write_csv(directory / f"hist_{name}.csv", (name, "count"), histogram_rows(values, 36, upper))

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, label in (("add_s", "ADD(-S)"), ("adds", "ADD-S"), ("add", "ADD")):
        auc = metrics.auc({"add_s": add_s, "adds": adds, "add": add}[name])
        ax.plot(THRESHOLDS_CM, curves[name], label=f"{label} (AUC {auc:.3f})")
    ax.set(
        xlabel="threshold (cm)", ylabel="accuracy", xlim=(0, 10), ylim=(0, 1.01), title=f"n = {len(records)}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(directory / "accuracy_vs_threshold.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (values, upper, label) in zip(axes, histograms.values(), strict=True):
        ax.hist(np.clip(values, 0, upper), bins=36, range=(0, upper), color="tab:blue")
        ax.set(xlabel=label, ylabel="instances", title=f"median {np.median(values):.3g}")
    axes[2].axvline(0.1, color="tab:red", linestyle="--", label="0.1 d")
    axes[2].legend()
    fig.tight_layout()
    with atomic_path(directory / "error_histograms.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

    if grid is not None:
        with atomic_path(directory / "predictions.png") as tmp:
            torchvision.io.write_png(grid, str(tmp))


def prediction_grid(dataset, records, n=16, min_size=128):
    """Up to `n` test images, evenly spread over the split, with true (dark) and predicted (bright) axes.

    Small images are enlarged (nearest neighbour, K scaled to match) so the axes stay readable.
    """
    picks = np.unique(np.linspace(0, len(records) - 1, min(n, len(records))).round().astype(int))
    chosen = [records[i] for i in picks]
    return draw.pose_grid(
        [dataset[int(i)]["image"] for i in picks],
        [r["K_input"] for r in chosen],
        [(r["R_gt"], r["t_gt"]) for r in chosen],
        [(r["R_pred"], r["t_pred"]) for r in chosen],
        0.5 * chosen[0]["diameter_mm"],
        min_size,
    )


def evaluate_pose(cfg, trained_cfg, estimator, device, out_dir):
    """Evaluate `estimator(image, K) -> (R, t_mm)` on the test split: (metrics, errors.csv rows, images);
    writes predictions.csv and plots/ into out_dir."""
    out_dir = Path(out_dir)
    d = cfg.data
    if trained_cfg is not None and int(trained_cfg.data.obj_id) != int(d.obj_id):
        raise ValueError(
            f"the checkpoint was trained on obj_id {trained_cfg.data.obj_id}, but data.obj_id={d.obj_id}"
        )
    # the network's input (size, crop or whole frame) as trained; the boxes (GT or detections) as configured
    dataset = bop.dataset_from_config(d, d.splits.test, "test", trained=(trained_cfg or cfg).data)
    info = bop.load_models_info(d.root)[int(d.obj_id)]
    symmetric = bop.is_symmetric(info)
    points = bop.load_model_points(d.root, d.obj_id)
    batch_size = cfg.training.get("batch_size", 64) if "training" in cfg else 64
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    records = predict(estimator, loader, device)
    add_errors(records, points, info["diameter"], symmetric)
    # instances the detections file found no box for have no estimate: failures in the recall-style keys
    summary = summarize(records, len(dataset.missed), dataset.detections is not None)
    grid = prediction_grid(dataset, records)
    write_predictions_csv(out_dir / "predictions.csv", records)
    write_json(out_dir / "evaluation_info.json", {
        "root": str(Path(d.root).resolve()), "split": str(d.splits.test), "obj_id": int(d.obj_id),
        "detections": str(Path(dataset.crop["detections"]).resolve()) if dataset.detections is not None else None,
        "n_test": summary["n_test"], "missed": [[int(x) for x in m] for m in dataset.missed],
    })  # fmt: skip
    with atomic_dir(out_dir / "plots") as tmp:
        write_plots(tmp, records, grid)
    print(
        f"test ({summary['n_estimated']} of {summary['n_test']} instances estimated): re {summary['re_deg_median']:.2f} deg, te {summary['te_cm_median']:.2f} cm "
        f"(medians), ADD(-S)<0.1d {summary['add_s_01d']:.3f}, ADD-S AUC {summary['adds_auc']:.3f}, "
        f"5deg5cm {summary['acc_5deg5cm']:.3f}"
    )
    images = {"test/predictions": grid.permute(1, 2, 0).numpy()}
    return summary, error_rows(records), images
