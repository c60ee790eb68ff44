"""Slow: run what a user runs in a freshly baked project — its own tests, its hooks, its pipeline."""

import json
import shutil

import pytest
from conftest import run

pytestmark = pytest.mark.slow


def pytest_suite(project, *args):
    result = run(["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=project)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result.stdout


# The default and the example-off bakes' whole suites run in test_quickstart.py, in the venv their own
# `make setup` builds; this option bake (no DVC, no wandb) runs in the template's venv.
def test_example_off_nodvc_nowandb_project_test_suite(bake):
    project = bake(include_example="no", use_dvc="no", use_wandb="no")
    assert " passed" in pytest_suite(project, "-m", "slow or not slow")
    (package,) = (project / "src").iterdir()
    assert not (package / "pose").exists() and (package / "task.py").exists()


def test_plan_and_review_commands_in_example_off_project(bake):
    """A skeleton for the user's own task: planning validates, review reads the user's metrics."""
    project = bake(include_example="no", use_dvc="no")
    plan = run(["make", "plan", "PYTHON=python"], cwd=project)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "task_accuracy" in plan.stdout, plan.stdout
    # The skeleton's `must` is `accuracy >= 0.9` (1_planning/requirements.yaml): the user's own
    # evaluation writes 3_training/metrics.json, the review passes or fails on it.
    metrics = project / "3_training" / "metrics.json"
    metrics.write_text(json.dumps({"accuracy": 0.95}))
    passed = run(["make", "review", "PYTHON=python"], cwd=project)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "PASS" in passed.stdout, passed.stdout
    review = json.loads((project / "6_metric_review" / "review.json").read_text())
    assert review["exit_code"] == 0 and review["requirements"][0]["status"] == "pass", review
    metrics.write_text(json.dumps({"accuracy": 0.5}))
    failed = run(["make", "review", "PYTHON=python"], cwd=project)
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "FAIL: must requirement(s) failed: task_accuracy" in failed.stdout, failed.stdout
    assert (
        "| task_accuracy (headline) | `accuracy >= 0.9` | 0.5 |"
        in (project / "6_metric_review" / "review.md").read_text()
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="pre-commit needs git")
def test_pre_commit_is_clean_on_a_fresh_bake(bake):
    project = bake()
    assert run(["make", "repo", "PYTHON=python"], cwd=project).returncode == 0  # pre-commit needs git
    result = run(["python", "-m", "pre_commit", "run", "-a"], cwd=project)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
