"""Shared helpers for the template tests: bake a project and look at what came out."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1]

# Every option value appears at least once, and the pairs that interact (example off + DVC on, example
# on + DVC off, wandb off with the example, CI none with the example off...) are covered.
MATRIX = {
    "default": {},
    "bare-dvc": {
        "include_example": "no",
        "use_dvc": "yes",
        "use_wandb": "no",
        "ci": "none",
        "license": "none",
        "python_version": "3.10",
    },
    "bare-nodvc": {
        "include_example": "no",
        "use_dvc": "no",
        "use_wandb": "yes",
        "license": "BSD-3-Clause",
        "python_version": "3.12",
    },
    "example-nodvc": {
        "include_example": "yes",
        "use_dvc": "no",
        "use_wandb": "no",
        "license": "Apache-2.0",
        "ci": "none",
    },
    "custom-names": {
        "project_name": "Grasp Pose",
        "package_name": "graspnet",
        "use_wandb": "no",
        "license": "BSD-3-Clause",
    },
}


@pytest.fixture
def bake(cookies):
    """Bake with extra_context; return the project path, failing with cookiecutter's error if any."""

    def _bake(**extra):
        result = cookies.bake(extra_context=extra)
        assert result.exception is None, result.exception
        assert result.exit_code == 0
        return Path(result.project_path)

    return _bake


def text_files(root):
    """All text files of a baked project, .git/.dvc internals excluded."""
    for path in sorted(root.rglob("*")):
        if not path.is_file() or {".git", ".dvc"} & set(path.relative_to(root).parts):
            continue
        try:
            yield path, path.read_text()
        except UnicodeDecodeError:
            continue


def make_targets(makefile_text):
    return set(re.findall(r"^([a-z][a-z0-9-]*):", makefile_text, flags=re.M))


def run(cmd, cwd, env=None, timeout=1800):
    """Run a command in a baked project with this interpreter's tools first on PATH."""
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(Path(cwd) / "src"),
        "WANDB_MODE": "offline",
        **(env or {}),
    }
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def newcomer_env(home):
    """This machine's environment minus every trace of the template's dev venv and of the calling make."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)]
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "WANDB_MODE"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GIT_")}
    cache = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return env | {
        "HOME": str(home),
        "PATH": os.pathsep.join(path),
        "PIP_CONSTRAINT": str(TEMPLATE / "constraints.txt"),
        "PIP_CACHE_DIR": cache,
    }
