"""`logger.mode` decides what wandb does, under make as by hand (no network, no account).

`make review` is the cheapest make target that starts a tracked run in every bake with wandb. Precedence:
`logger.mode=...` on the command line > WANDB_MODE in the environment > offline (configs/logger/wandb.yaml).
"""

import json
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


def review(project, overrides="", pythonpath=(), **env):
    """`make review` with these OVERRIDES and WANDB_MODE (None: unset); returns the new wandb run folders."""
    before = set((project / "logs/wandb").glob("*run-*"))
    full_env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    full_env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(project / "src")])
    full_env.update({k.upper(): v for k, v in env.items() if k != "wandb_mode"})
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
    (made,) = review(project, "logger.mode=offline", wandb_mode="disabled")
    assert made.startswith("offline-run-")


def test_environment_fills_in_the_default_and_offline_is_the_default(project):
    assert review(project, wandb_mode="disabled") == []
    (made,) = review(project)
    assert made.startswith("offline-run-")


# A stand-in `wandb` that records what wandb.init was given: `online` can be checked without a network.
RECORDING_WANDB = """
import json, os

def init(**kwargs):
    kwargs.pop("config")
    with open(os.environ["WANDB_INIT_RECORD"], "w") as f:
        json.dump(kwargs, f)
    return Run()

class Run:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass

def Table(**kwargs):
    return kwargs

def Image(*args, **kwargs):
    return args
"""


def test_every_logger_key_reaches_wandb_init_under_make(project, tmp_path):
    (tmp_path / "shim/wandb").mkdir(parents=True)
    (tmp_path / "shim/wandb/__init__.py").write_text(RECORDING_WANDB)
    record = tmp_path / "init.json"
    overrides = f"logger.mode=online logger.project=p1 logger.group=g1 logger.dir={tmp_path / 'runs'}"
    shim = [tmp_path / "shim"]
    review(project, overrides, pythonpath=shim, wandb_mode="offline", wandb_init_record=str(record))
    init = json.loads(record.read_text())
    assert init["mode"] == "online", "logger.mode=online did not reach wandb.init under make"
    assert (init["project"], init["group"], init["dir"]) == ("p1", "g1", str(tmp_path / "runs"))
    assert init["job_type"] == "metric_review"
