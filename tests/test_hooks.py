"""Bad answers fail with one clear message naming the prompt, and leave nothing on disk."""

import subprocess
import sys

import pytest
from conftest import TEMPLATE

BAD_ANSWERS = {
    "slug with a space": ({"project_slug": "my project"}, "project_slug"),
    "slug starting with a digit": ({"project_slug": "3d-pose"}, "project_slug"),
    "slug with uppercase": ({"project_slug": "PoseNet"}, "project_slug"),
    "slug with a path separator": ({"project_slug": "a/b"}, "project_slug"),
    "slug from a name with symbols": ({"project_name": "Pose! Estimation?"}, "project_slug"),
    "package with a dash": ({"package_name": "pose-net"}, "package_name"),
    "package starting with a digit": ({"package_name": "6dpose"}, "package_name"),
    "package is a keyword": ({"package_name": "class"}, "keyword"),
    "package shadows stdlib": ({"package_name": "json"}, "standard-library"),
    "package shadows torch": ({"package_name": "torch"}, "shadow"),
    "package shadows hydra": ({"package_name": "hydra"}, "shadow"),
    "package shadows dvc": ({"package_name": "dvc"}, "shadow"),
    "email without at": ({"author_email": "me.example.com"}, "author_email"),
    "email without domain dot": ({"author_email": "me@localhost"}, "author_email"),
    "email with spaces": ({"author_email": "me @example.com"}, "author_email"),
    "empty project name": (
        {"project_name": " ", "project_slug": "x", "package_name": "x_pkg"},
        "project_name",
    ),
    "description with a quote": ({"description": 'the "best" model'}, "description"),
}
UNKNOWN_CHOICES = {
    "license": "GPL-3.0",
    "python_version": "2.7",
    "include_example": "maybe",
    "use_wandb": "sometimes",
    "use_dvc": "1",
    "ci": "jenkins",
}


def bake_cli(tmp_path, extra):
    """Run cookiecutter as a user would (CLI, --no-input), into an empty folder."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "cookiecutter", "--no-input", "-o", str(out), str(TEMPLATE)]
    cmd += [f"{key}={value}" for key, value in extra.items()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return result, out


@pytest.mark.parametrize("extra, message", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
def test_bad_answer_is_rejected_and_leaves_nothing(tmp_path, extra, message):
    result, out = bake_cli(tmp_path, extra)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "ERROR" in result.stderr
    assert list(out.rglob("*")) == [], f"left behind: {list(out.rglob('*'))}"


@pytest.mark.parametrize("key, value", UNKNOWN_CHOICES.items(), ids=UNKNOWN_CHOICES.keys())
def test_unknown_choice_is_rejected_and_leaves_nothing(tmp_path, key, value):
    result, out = bake_cli(tmp_path, {key: value})
    assert result.returncode != 0
    assert key in result.stderr and value in result.stderr, result.stderr
    assert list(out.rglob("*")) == []


def test_hook_reports_every_bad_answer_at_once(tmp_path):
    result, out = bake_cli(tmp_path, {"package_name": "json", "author_email": "nope"})
    assert "package_name" in result.stderr and "author_email" in result.stderr
    assert list(out.rglob("*")) == []


def test_bake_needs_no_tool_beside_cookiecutter_and_creates_no_repository(tmp_path):
    """With nothing on PATH (no git, no dvc) the bake succeeds, creates no .git (cruft re-runs the hook in
    temporary bakes, where a .git breaks `cruft update`) and points at `make setup`, which creates it."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    out = tmp_path / "out"
    env = {"PATH": str(empty), "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "cookiecutter", "--no-input", "-o", str(out), str(TEMPLATE)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    project = out / "my-dl-project"
    assert (project / "README.md").exists()
    assert not (project / ".git").exists() and not (project / ".dvc").exists()
    assert "make setup" in result.stdout


def test_good_custom_answers_are_accepted(cookies):
    result = cookies.bake(
        extra_context={
            "project_name": "Robot Grasp",
            "package_name": "robot_grasp_pose",
            "author_email": "a.b@c.io",
        }
    )
    assert result.exit_code == 0, result.exception
    assert (result.project_path / "src" / "robot_grasp_pose").is_dir()
    assert not (result.project_path / ".git").exists()
