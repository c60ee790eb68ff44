"""`make bop-results`: per-object evaluations of a two-object BOP split (test_foreign_bop's painter) merged
into one BOP results CSV with per-object and overall metrics; a missed detection is a failure."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_foreign_bop import MISSED, write_foreign_bop

from conftest import compose
from {{ cookiecutter.package_name }} import evaluation
from {{ cookiecutter.package_name }}.data import bop
from {{ cookiecutter.package_name }}.pose import bop_results

PROJECT = Path(__file__).resolve().parents[2]
SHIFT_MM = 20.0  # > 0.1 x either object's diameter (78 mm, 73 mm): an ADD(-S) failure
WRONG = (0, 4)  # obj 1's frames the oracle is wrong in (obj 1 is there 2 + 1 times); MISSED is frame 2
# batches of one: every instance has its own network time (an image's time is the sum of its instances')
BASE = ["data=bop", "data.image_size=32", "data.splits.test=test", "logger=none", "device=cpu"]
BASE += ["training.batch_size=1"]


class Oracle(torch.nn.Module):
    """Knows every test instance's crop intrinsics (unique per instance) and answers its true pose, shifted
    by SHIFT_MM along x in the frames (im_id) listed in `wrong`."""

    def __init__(self, dataset, wrong=()):
        super().__init__()
        self.poses = {}
        for i in range(len(dataset)):
            item = dataset[i]
            t = item["t"] + torch.tensor([SHIFT_MM, 0.0, 0.0]) * (item["im_id"] in wrong)
            self.poses[item["K"].numpy().tobytes()] = (item["R"], t)

    def forward(self, image, K):
        poses = [self.poses[k.numpy().tobytes()] for k in K]
        return torch.stack([R for R, _ in poses]), torch.stack([t for _, t in poses])


def evaluate_object(root, out, obj_id, detections=None, wrong=()):
    """Evaluate obj_id with the oracle into `out` (a 3_training-style folder); returns its metrics."""
    extra = [f"data.crop.detections={detections}"] if detections else []
    cfg = compose(*BASE, f"data.root={root}", f"data.obj_id={obj_id}", f"paths.root={out.parent}",
                  f"paths.training={out}", *extra)  # fmt: skip
    dataset = bop.dataset_from_config(cfg.data, "test", "test")
    return evaluation.evaluate(cfg, Oracle(dataset, wrong), torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """obj 1 (wrong in frames WRONG) and obj 2 (all right), on GT boxes and on the detections file."""
    root = tmp_path_factory.mktemp("bopall") / "bop"
    detections = write_foreign_bop(root)
    out = tmp_path_factory.mktemp("evaluations")
    wrong = {1: WRONG, 2: ()}
    summaries = {}
    for boxes, det in (("gt", None), ("det", detections)):
        for obj_id in (1, 2):
            folder = out / boxes / f"obj_{obj_id:06d}"
            summaries[boxes, obj_id] = evaluate_object(root, folder, obj_id, det, wrong[obj_id])
    return root, detections, out, summaries


def read_like_bop_toolkit(path):
    """bop_toolkit inout.load_bop_results (bop19): header skipped, 7 comma-separated fields per line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines()):
        if number == 0 and "scene_id,im_id,obj_id,score,R,t,time" in line:
            continue
        e = line.split(",")
        assert len(e) == 7, line
        rows.append({"scene_id": int(e[0]), "im_id": int(e[1]), "obj_id": int(e[2]), "score": float(e[3]),
                     "R": np.array(list(map(float, e[4].split()))).reshape(3, 3),
                     "t": np.array(list(map(float, e[5].split()))).reshape(3, 1), "time": float(e[6])})  # fmt: skip
    return rows


def wrong_instances(folder):
    """How many of errors.csv's instances lie in the frames WRONG."""
    with open(folder / "errors.csv", newline="") as f:
        return sum(int(row["im_id"]) in WRONG for row in csv.DictReader(f))


def merge(out, boxes, **kwargs):
    folders = sorted((out / boxes).glob("obj_*"))
    return bop_results.merge(folders, out / boxes / "bop", "tiny", "foreign", **kwargs)


def test_one_results_csv_holds_every_object_with_the_image_time(runs):
    _, _, out, summaries = runs
    summary = merge(out, "gt")
    path = out / "gt" / "bop" / "tiny_foreign-test.csv"
    assert summary["results"] == path.name and path.is_file()
    rows = read_like_bop_toolkit(path)
    per_object = {k: read_like_bop_toolkit(out / "gt" / f"obj_{k:06d}" / "predictions.csv") for k in (1, 2)}
    assert len(rows) == summaries["gt", 1]["n_test"] + summaries["gt", 2]["n_test"]
    assert {r["obj_id"] for r in rows} == {1, 2}
    assert [(r["scene_id"], r["im_id"], r["obj_id"]) for r in rows] == sorted(
        (r["scene_id"], r["im_id"], r["obj_id"]) for k in (1, 2) for r in per_object[k]
    )
    for k in (1, 2):  # the poses are the per-object runs' poses
        merged = [r for r in rows if r["obj_id"] == k]
        for a, b in zip(merged, sorted(per_object[k], key=lambda r: r["im_id"]), strict=True):
            assert np.allclose(a["R"], b["R"], atol=1e-6) and np.allclose(a["t"], b["t"], atol=1e-4)
    # BOP: one time per image, every object's estimates included (bop_toolkit check_bop_results' rule); obj 1
    # is twice in frames 0 and 3: its own file gives both rows the image's time, not each instance's
    times = {}
    for r in per_object[1]:
        times.setdefault(r["im_id"], set()).add(r["time"])
    assert all(len(t) == 1 for t in times.values())
    assert len([r for r in per_object[1] if r["im_id"] == 0]) == 2
    # BOP: one time per image, every object's estimates included (bop_toolkit check_bop_results' rule)
    for r in rows:
        same_image = [x["time"] for x in rows if (x["scene_id"], x["im_id"]) == (r["scene_id"], r["im_id"])]
        assert max(same_image) - min(same_image) <= 1e-3
        own = [next(x["time"] for x in per_object[k] if x["im_id"] == r["im_id"]) for k in (1, 2)
               if any(x["im_id"] == r["im_id"] for x in per_object[k])]  # fmt: skip
        assert r["time"] == pytest.approx(sum(own), rel=1e-4) and r["time"] > 0
    assert bop_results.read_bop_results(path)[0]["R"].shape == (3, 3)


def test_per_object_metrics_are_the_runs_and_overall_pools_every_instance(runs):
    _, _, out, summaries = runs
    summary = merge(out, "gt")
    written = json.loads((out / "gt" / "bop" / "bop_metrics.json").read_text())
    for k in (1, 2):
        assert written["objects"][str(k)] == summaries["gt", k]
        assert written["objects"][str(k)] == json.loads(
            (out / "gt" / f"obj_{k:06d}" / "metrics.json").read_text()
        )
    n1, n2 = summaries["gt", 1]["n_test"], summaries["gt", 2]["n_test"]
    w = wrong_instances(out / "gt" / "obj_000001")
    pooled = written["pooled"]
    # the oracle is wrong on w instances of obj 1 only: pooled over all instances, not averaged per object
    assert (
        summaries["gt", 1]["add_s_01d"] == pytest.approx((n1 - w) / n1)
        and summaries["gt", 2]["add_s_01d"] == 1
    )
    assert pooled["n_test"] == n1 + n2 and pooled["add_s_01d"] == pytest.approx((n1 + n2 - w) / (n1 + n2))
    assert written["mean_over_objects"]["add_s_01d"] == pytest.approx(((n1 - w) / n1 + 1) / 2)
    assert written["mean_over_objects"]["n_test"] == n1 + n2
    te = [summaries["gt", k]["te_cm_mean"] * summaries["gt", k]["n_test"] for k in (1, 2)]
    assert pooled["te_cm_mean"] == pytest.approx(sum(te) / (n1 + n2))
    assert (
        written["pooled"] == summary["pooled"]
        and written["mean_over_objects"] == summary["mean_over_objects"]
    )
    table = (out / "gt" / "bop" / "bop_metrics.md").read_text()
    assert "| obj 1 |" in table and "| obj 2 |" in table and "pooled" in table and "mean" in table
    assert not [p for p in (out / "gt" / "bop").iterdir() if p.name.startswith(".")]  # no temp files


def test_a_missed_detection_lowers_the_recall_by_one_instance(runs):
    _, _, out, summaries = runs
    gt, det = summaries["gt", 2], summaries["det", 2]  # obj 2: the oracle is right on every instance
    assert gt["add_s_01d"] == 1.0 and det["add_s_01d_detected"] == 1.0
    assert "detection_recall" not in gt and "add_s_01d_detected" not in gt
    # obj 1 has no detection in frame MISSED[1]: one annotated instance without an estimate
    assert MISSED[0] == 1
    gt1, det1 = summaries["gt", 1], summaries["det", 1]
    n = gt1["n_test"]
    assert (
        det1["n_test"] == n
        and det1["n_estimated"] == n - 1
        and det1["detection_recall"] == pytest.approx((n - 1) / n)
    )
    info = json.loads((out / "det" / "obj_000001" / "evaluation_info.json").read_text())
    assert len(info["missed"]) == 1 and info["missed"][0][1] == MISSED[1]
    # the oracle is wrong in other frames than the missed one: the miss costs exactly 1/n over all instances
    w = wrong_instances(out / "gt" / "obj_000001")
    assert w >= 2 and w == wrong_instances(out / "det" / "obj_000001")
    assert gt1["add_s_01d"] == pytest.approx((n - w) / n) and det1["add_s_01d"] == pytest.approx(
        (n - w - 1) / n
    )
    assert det1["add_s_01d_detected"] == pytest.approx(det1["add_s_01d"] * n / (n - 1))

    summary = merge(out, "det")
    pooled = summary["pooled"]
    assert pooled["n_test"] == gt1["n_test"] + gt["n_test"] and pooled["n_estimated"] == pooled["n_test"] - 1
    assert pooled["add_s_01d"] == pytest.approx(
        merge(out, "gt")["pooled"]["add_s_01d"] - 1 / pooled["n_test"]
    )
    rows = read_like_bop_toolkit(out / "det" / "bop" / "tiny_foreign-test.csv")
    assert len(rows) == pooled["n_estimated"]  # no row for the miss


def test_bad_folders_fail_with_the_reason(runs, tmp_path):
    _, _, out, _ = runs
    gt = sorted((out / "gt").glob("obj_*"))
    with pytest.raises(FileNotFoundError, match=r"nowhere: no per-object evaluation.*make train evaluate"):
        bop_results.merge([*gt, tmp_path / "nowhere"], tmp_path / "bop", "tiny")
    duplicate = tmp_path / "obj_again"
    shutil.copytree(gt[0], duplicate)
    with pytest.raises(ValueError, match=r"obj_id 1 is evaluated twice.*obj_again"):
        bop_results.merge([*gt, duplicate], tmp_path / "bop", "tiny")
    with pytest.raises(ValueError, match=r"detections"):
        bop_results.merge([gt[0], out / "det" / "obj_000002"], tmp_path / "bop", "tiny")
    with pytest.raises(ValueError, match=r"objects \[2\] are annotated in .*test but have no evaluation"):
        bop_results.merge(gt[:1], tmp_path / "bop", "tiny")
    assert bop_results.merge(gt[:1], tmp_path / "bop", "tiny", require_all=False)["objects"].keys() == {1}
    with pytest.raises(ValueError, match=r"method='my_net'"):
        bop_results.merge(gt, tmp_path / "bop", "my_net")
    with pytest.raises(FileNotFoundError, match="no per-object evaluation folders"):
        bop_results.merge([], tmp_path / "bop", "tiny")


@pytest.mark.slow
def test_make_bop_results_merges_the_obj_folders(runs):
    root, _, out, _ = runs
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "src"))
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}.pose.bop_results", *BASE, f"data.root={root}",
               f"paths.training={out / 'gt'}", "data.bop_results.dataset=foreign"]  # fmt: skip
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (
        out / "gt" / "bop" / f"{compose(*BASE, 'data.root=x').data.bop_results.method}_foreign-test.csv"
    ).is_file()
    assert "| obj 2 |" in result.stdout
    result = subprocess.run([*command, "paths.training=/nonexistent"], cwd=PROJECT, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "no per-object evaluation folders" in result.stderr
    assert "Traceback" not in result.stderr
