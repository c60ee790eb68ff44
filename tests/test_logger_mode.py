"""`logger.mode` decides what wandb does, under make as by hand (no network, no account).

`make review` is the cheapest make target that starts a tracked run in every bake with wandb. Precedence:
`logger.mode=...` on the command line > WANDB_MODE in the environment > offline (configs/logger/wandb.yaml).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def project(cookies_session):
    result = cookies_session.bake(extra_context={"include_example": "no", "use_dvc": "no"})
    assert result.exception is None, result.exception
    return result.project_path


def review(project, overrides="", **env):
    """`make review` with these OVERRIDES and WANDB_MODE (None: unset); returns the new wandb run folders."""
    before = set((project / "logs/wandb").glob("*run-*"))
    full_env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    full_env["PYTHONPATH"] = str(project / "src")
    if env.get("wandb_mode"):
        full_env["WANDB_MODE"] = env["wandb_mode"]
    cmd = ["make", "review", "PYTHON=python", f"OVERRIDES={overrides}"]
    result = subprocess.run(cmd, cwd=project, env=full_env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert "report:" in output or "review:" in output, output[-3000:]  # the stage ran to its end
    assert "Traceback" not in output, output[-3000:]
    return sorted(p.name for p in set((project / "logs/wandb").glob("*run-*")) - before)


def test_command_line_mode_beats_the_environment(project):
    assert review(project, "logger.mode=disabled", wandb_mode="offline") == []
    (made,) = review(project, "logger.mode=offline logger.group=g1", wandb_mode="disabled")
    assert made.startswith("offline-run-")


def test_environment_fills_in_the_default_and_offline_is_the_default(project):
    assert review(project, wandb_mode="disabled") == []
    (made,) = review(project)
    assert made.startswith("offline-run-")
