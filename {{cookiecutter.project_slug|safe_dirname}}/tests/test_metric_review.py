"""Metric review (stage 6): requirements vs measured, exit codes, slices, history trend, flags."""

import csv
import json
import math
import os
{%- if cookiecutter.use_dvc == "yes" %}
import shutil
{%- endif %}
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from {{ cookiecutter.package_name }} import metric_review as mr
{%- if cookiecutter.include_example == "yes" %}
from {{ cookiecutter.package_name }}.pose.task import PoseTask
{%- endif %}

PROJECT = Path(__file__).resolve().parents[1]
REQUIREMENTS = [
    {
        "name": "accuracy",
        "metric": "add_s_01d",
        "op": ">=",
        "target": 0.5,
        "priority": "should",
        "why": "grasp success",
        "headline": True,
        "sample_fails_when": "add_s_mm >= 0.1 * diameter_mm",
    },
    {
        "name": "rotation",
        "metric": "re_deg_median",
        "op": "<=",
        "target": 10,
        "priority": "must",
        "why": "gripper",
    },
    {
        "name": "latency",
        "metric": "latency_ms_p95",
        "op": "<=",
        "target": 50,
        "priority": "must",
        "why": "20 Hz",
    },
]
GOOD_METRICS = {"add_s_01d": 0.7, "re_deg_median": 6.0, "te_cm_median": 0.8, "n_test": 100}


def setup(tmp_path, metrics=GOOD_METRICS, latency=None, requirements=REQUIREMENTS, errors=None):
    (tmp_path / "requirements.yaml").write_text(
        yaml.safe_dump({"requirements": requirements}, sort_keys=False)
    )
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    if latency is not None:
        (tmp_path / "latency.json").write_text(json.dumps(latency))
    if errors is not None:
        with (tmp_path / "errors.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(errors[0]))
            writer.writeheader()
            writer.writerows(errors)
    return {
        "metrics": tmp_path / "metrics.json",
        "latency": tmp_path / "latency.json",
        "service_log": tmp_path / "service_log.jsonl",
        "errors": tmp_path / "errors.csv",
        "out": tmp_path / "review",
        "history": tmp_path / "review" / "history.jsonl",
        "dvc_diff": False,
    }


def run_review(tmp_path, settings, **kwargs):
    return mr.review(settings, tmp_path / "requirements.yaml", root=tmp_path, **kwargs)


def test_all_musts_pass_exit_0(tmp_path):
    settings = setup(
        tmp_path, latency={"latency_ms_p50": 10.0, "latency_ms_p95": 20.0, "model_size_mb": 40.0}
    )
    result = run_review(tmp_path, settings)
    assert result["exit_code"] == 0 and result["verdict"].startswith("PASS")
    assert {r["name"]: r["status"] for r in result["requirements"]} == {
        "accuracy": "pass",
        "rotation": "pass",
        "latency": "pass",
    }
    report = (tmp_path / "review" / "review.md").read_text()
    assert "Does the metric drive downstream behaviour?" in report
    assert "Is real-world performance good enough?" in report
    assert json.loads((tmp_path / "review" / "review.json").read_text())["exit_code"] == 0


def test_failing_must_exits_1_unless_not_strict(tmp_path):
    settings = setup(
        tmp_path, metrics=GOOD_METRICS | {"re_deg_median": 25.0}, latency={"latency_ms_p95": 20.0}
    )
    result = run_review(tmp_path, settings)
    assert result["exit_code"] == 1 and "rotation" in result["verdict"]
    # the headline passes while a must fails: the metric does not drive what the user needs
    assert any("headline" in flag and "rotation" in flag for flag in result["metric_flags"])
    assert run_review(tmp_path, settings | {"strict": False})["exit_code"] == 0


def test_failing_should_warns_but_exits_0(tmp_path):
    settings = setup(tmp_path, metrics=GOOD_METRICS | {"add_s_01d": 0.3}, latency={"latency_ms_p95": 20.0})
    result = run_review(tmp_path, settings)
    assert result["exit_code"] == 0
    assert "warning" in result["verdict"] and "accuracy" in result["verdict"]
    # the headline fails while every must passes: flagged too
    assert any("stricter" in flag for flag in result["metric_flags"])


def test_unmeasured_must_fails(tmp_path):
    settings = setup(tmp_path)  # no latency.json: latency_ms_p95 is not measured
    result = run_review(tmp_path, settings)
    latency = next(r for r in result["requirements"] if r["name"] == "latency")
    assert latency["status"] == "not measured" and latency["value"] is None
    assert result["exit_code"] == 1
    assert any("latency.json" in note and "not found" in note for note in result["notes"])
    # NaN counts as not measured too
    settings = setup(tmp_path, latency={"latency_ms_p95": math.nan})
    assert run_review(tmp_path, settings)["exit_code"] == 1


def test_bad_metrics_file_is_a_clear_error(tmp_path):
    settings = setup(tmp_path)
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(mr.ReviewError, match="metrics.json"):
        run_review(tmp_path, settings)


{%- if cookiecutter.include_example == "yes" %}


def pose_row(i, depth, visib, symmetric, add_mm, rot_z_deg=0.0):
    c, s = math.cos(math.radians(rot_z_deg)), math.sin(math.radians(rot_z_deg))
    return {
        "scene_id": 0, "im_id": i, "obj_id": 1, "gt_id": 0, "rgb_path": "", "re_deg": 5.0, "te_cm": 0.5,
        "add_mm": add_mm, "adds_mm": add_mm, "diameter_mm": 100.0, "symmetric": symmetric, "visib_fract": visib,
        "R_gt": f"{c} {-s} 0 {s} {c} 0 0 0 1", "t_gt": f"0 0 {depth}", "R_pred": "1 0 0 0 1 0 0 0 1",
        "t_pred": f"0 0 {depth}", "K": "500 0 320 0 500 240 0 0 1",
    }  # fmt: skip


def test_slices_of_the_headline(tmp_path):
    errors = []
    for i in range(30):
        depth = (300, 600, 900)[i % 3]
        far = depth == 900
        occluded = i % 2 == 0
        # far or occluded views fail ADD(-S) < 0.1 d
        errors.append(
            pose_row(
                i,
                depth,
                0.3 if occluded else 0.95,
                int(i % 5 == 0),
                50.0 if (far or occluded) else 2.0,
                rot_z_deg=100 if i < 10 else 10,
            )
        )
    settings = setup(tmp_path, latency={"latency_ms_p95": 20.0}, errors=errors)
    result = run_review(tmp_path, settings, task=PoseTask(None))
    slices = result["slices"]
    assert set(slices) == {"distance (camera depth)", "rotation magnitude", "visibility", "symmetry"}
    distance = slices["distance (camera depth)"]
    assert [row["slice"] for row in distance] == ["30–50 cm", "50–70 cm", "70–90 cm"]
    assert [row["n"] for row in distance] == [10, 10, 10]
    assert distance[-1]["pass_rate"] == 0.0 and distance[0]["pass_rate"] == pytest.approx(0.5)
    visibility = {row["slice"]: row for row in slices["visibility"]}
    assert visibility["<50% visible"]["pass_rate"] == 0.0 and visibility["≥80% visible"]["n"] == 15
    rotation = {row["slice"]: row["n"] for row in slices["rotation magnitude"]}
    assert rotation == {"0–45°": 20, "90–135°": 10}
    assert {row["slice"] for row in slices["symmetry"]} == {"asymmetric", "symmetric"}
    assert "distance (camera depth): 70–90 cm" in result["weak_slices"]
    assert (tmp_path / "review" / "slices.png").is_file()
    # extra slices on any numeric column
    result = run_review(
        tmp_path, settings | {"extra_slices": {"visib_fract": [0, 0.5, 1.01]}}, task=PoseTask(None)
    )
    assert [row["n"] for row in result["slices"]["visib_fract"]] == [15, 15]
{%- endif %}


def test_slices_of_your_own_task(tmp_path):
    requirements = [
        {"name": "acc", "metric": "accuracy", "op": ">=", "target": 0.9, "priority": "must", "why": "users"}
        | {"headline": True, "sample_fails_when": "correct == 0"}
    ]
    errors = [
        {"id": i, "correct": int(i % 4 != 0), "slice_camera": "night" if i % 2 else "day"} for i in range(40)
    ]
    settings = setup(tmp_path, metrics={"accuracy": 0.75}, requirements=requirements, errors=errors)
    result = run_review(tmp_path, settings)
    camera = {row["slice"]: row for row in result["slices"]["camera"]}
    assert camera["day"]["pass_rate"] == pytest.approx(0.5) and camera["night"]["pass_rate"] == 1.0
    assert result["weak_slices"] == ["camera: day"] and result["exit_code"] == 1


def test_history_trend_and_opposite_moves(tmp_path):
    latency = {"latency_ms_p95": 20.0}
    settings = setup(tmp_path, latency=latency)
    first = run_review(tmp_path, settings)
    assert first["n_history"] == 0 and all(t["change"] is None for t in first["trend"])
    # next model: headline better, rotation worse (still passing), latency worse
    setup(
        tmp_path,
        metrics=GOOD_METRICS | {"add_s_01d": 0.8, "re_deg_median": 9.0},
        latency={"latency_ms_p95": 30.0},
    )
    second = run_review(tmp_path, settings)
    assert second["n_history"] == 1
    trend = {t["name"]: t for t in second["trend"]}
    assert trend["accuracy"]["previous"] == [0.7] and trend["accuracy"]["better"] is True
    assert trend["rotation"]["change"] == pytest.approx(3.0) and trend["rotation"]["better"] is False
    assert any(
        "improved" in flag and "rotation" in flag and "latency" in flag for flag in second["metric_flags"]
    )
    lines = (tmp_path / "review" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["metrics"]["add_s_01d"] == 0.8
    assert (tmp_path / "review" / "trend.png").is_file()
    assert "0.7" in (tmp_path / "review" / "review.md").read_text()


def test_checklist_items_are_named(tmp_path):
    settings = setup(tmp_path, latency={"latency_ms_p95": 20.0})
    items = mr.checklist_items(PROJECT / "6_metric_review" / "CHECKLIST.md")
    run_review(tmp_path, settings, checklist=items)
    report = (tmp_path / "review" / "review.md").read_text()
    assert all(item in report for item in items)
{%- if cookiecutter.use_dvc == "yes" %}


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="a DVC repository needs git")
def test_dvc_metrics_diff_on_a_two_commit_history(tmp_path, monkeypatch):
    """A real git + DVC repo: metrics.json committed twice, then changed in the workspace."""
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert mr.dvc_metrics_diff(tmp_path) is None  # not a DVC repo
    git(tmp_path, "init", "-q")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics.json\n")
    settings = setup(tmp_path, metrics=GOOD_METRICS | {"re_deg_median": 8.0})
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    setup(tmp_path, metrics=GOOD_METRICS)  # re_deg_median 6.0
    git(tmp_path, "commit", "-qam", "second")
    assert mr.dvc_metrics_diff(tmp_path) is None  # workspace == HEAD: nothing to show
    setup(tmp_path, metrics=GOOD_METRICS | {"re_deg_median": 4.5})
    table = mr.dvc_metrics_diff(tmp_path)
    assert table is not None
    row = next(line for line in table.splitlines() if "re_deg_median" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["metrics.json", "re_deg_median", "6.0", "4.5", "-1.5"], table
    assert "add_s_01d" not in table  # unchanged metrics are left out
    # the review puts it in its report (settings.dvc_diff on), and leaves it out inside a DVC stage
    result = run_review(tmp_path, settings | {"dvc_diff": True})
    assert result["dvc_metrics_diff"] == table
    assert "`dvc metrics diff` (workspace vs HEAD):" in (tmp_path / "review" / "review.md").read_text()
    monkeypatch.setenv("DVC_STAGE", "review")
    assert mr.dvc_metrics_diff(tmp_path) is None
{%- endif %}
{%- if cookiecutter.include_example == "yes" %}


def test_high_production_flagged_rate_points_back_to_planning(tmp_path):
    settings = setup(tmp_path, latency={"latency_ms_p95": 20.0})
    with (tmp_path / "service_log.jsonl").open("w") as f:
        for i in range(10):
            f.write(json.dumps({"type": "prediction", "id": f"p{i}", "latency_ms": 12.0}) + "\n")
        for i in range(3):
            f.write(json.dumps({"type": "feedback", "id": f"p{i}", "reason": "mirrored"}) + "\n")
    result = run_review(tmp_path, settings)
    assert result["production"]["flagged_rate"] == pytest.approx(0.3)
    assert result["production_flags"] and "real world" in result["production_flags"][0]
    assert "1_planning/requirements.yaml" in (tmp_path / "review" / "review.md").read_text()
{%- endif %}


def test_make_review_exit_code(tmp_path):
    setup(tmp_path, metrics=GOOD_METRICS | {"re_deg_median": 25.0}, latency={"latency_ms_p95": 20.0})
    pythonpath = os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])
    overrides = [
        f"paths.root={tmp_path}",
        f"paths.requirements={tmp_path / 'requirements.yaml'}",
        f"metric_review.metrics={tmp_path / 'metrics.json'}",
        f"metric_review.latency={tmp_path / 'latency.json'}",
        "logger=none",
    ]
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}.metric_review", *overrides]
    env = os.environ | {"PYTHONPATH": pythonpath}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout and (tmp_path / "6_metric_review" / "review.md").is_file()
    done = subprocess.run(
        [*command, "metric_review.strict=false"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
