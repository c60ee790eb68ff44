"""Slow: run what a user runs in a freshly baked project — its own tests, its hooks, its pipeline."""

import json
import shutil
import subprocess

import pytest
from conftest import newcomer_env, run

pytestmark = pytest.mark.slow


# The default and the example-off bakes' whole suites run in test_quickstart.py. The option bakes without
# DVC and wandb run here, each in the venv its own `make setup` builds from its pyproject alone (with the
# newcomer's environment: nothing of the template's dev venv on PATH): a dependency the bake uses but does
# not declare fails here. The example bake runs its fast tests; its slow ones are the default's.
@pytest.mark.parametrize(
    ("options", "target"),
    [
        ({"include_example": "no", "use_dvc": "no", "use_wandb": "no"}, "test-all"),
        ({"include_example": "yes", "use_dvc": "no", "use_wandb": "no"}, "test"),
    ],
    ids=["example-off-nodvc-nowandb", "example-nodvc-nowandb"],
)
def test_option_bake_suite_in_its_own_venv(bake, tmp_path, options, target):
    project = bake(**options)
    try:
        _check_option_bake(project, tmp_path, options, target)
    finally:
        # each venv holds a torch install (GBs, a CUDA build on x86_64): gone once read, pass or fail, so the
        # suite's disk need is one such venv beside the template's own, not one per test
        shutil.rmtree(project / ".venv", ignore_errors=True)


def _check_option_bake(project, tmp_path, options, target):
    (tmp_path / "home").mkdir()
    env = newcomer_env(tmp_path / "home")
    for command in ("make setup", f"make {target}"):
        result = subprocess.run(
            ["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=3600
        )
        assert result.returncode == 0, f"`{command}`:\n" + result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-3000:]
    installed = subprocess.run(
        [str(project / ".venv/bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
    )
    names = {package["name"].lower() for package in json.loads(installed.stdout)}
    assert not {"dvc", "wandb", "cookiecutter"} & names, names
    (package,) = (p.parent for p in (project / "src").glob("*/__init__.py"))  # not the install's egg-info
    assert (package / "pose").exists() == (options["include_example"] == "yes")
    assert (package / "task.py").exists()


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
