"""Slow: `make pipeline EXPERIMENT=scenes_smoke` in a freshly baked project (issue 12): the DVC pipeline's
capture stage renders full-frame multi-object scenes, and qa, train, evaluate, analyze, export and review
run on them (zoom-in crops around the ground-truth boxes)."""

import json
from pathlib import Path

import pytest
from conftest import TEMPLATE, run
from cookiecutter.main import cookiecutter

pytestmark = pytest.mark.slow


def ok(result):
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def test_make_pipeline_runs_every_stage_on_scenes(tmp_path):
    project = Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(tmp_path)))
    ok(run(["make", "repo", "PYTHON=python"], cwd=project))
    log = ok(run(["make", "pipeline", "PYTHON=python", "EXPERIMENT=scenes_smoke"], cwd=project)).stdout
    for stage in ("capture", "qa", "train", "evaluate", "analyze", "export", "review"):
        assert f"Running stage '{stage}'" in log, stage
    dataset = project / "2_data" / "dataset"
    assert {p.name for p in dataset.iterdir()} >= {"train_pbr", "val", "test", "detections", "models"}
    gt = json.loads((dataset / "test" / "000005" / "scene_gt.json").read_text())
    assert all(len(instances) == 3 for instances in gt.values())  # several objects per frame
    assert json.loads((project / "2_data/qa/report.json").read_text())["passed"] is True
    metrics = json.loads((project / "3_training/metrics.json").read_text())
    assert metrics["n_test"] >= 3
    assert (project / "5_deployment/model.onnx").is_file()
