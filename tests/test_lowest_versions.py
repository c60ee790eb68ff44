"""Slow: the baked project's lower bounds are true. Its fast tests pass with the lowest allowed version of
every direct dependency (`uv pip install --resolution lowest-direct`).

torch and torchvision are the exception: their lowest allowed wheels are multi-GB CUDA builds, so they are
kept out of the resolution (an override no platform matches) and this venv reads the tested ones, the
template venv's (constraints.txt pins), through a .pth file listing only them and their own dependencies.
The project's own packages always come first on sys.path, so nothing else leaks in from the template venv.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from conftest import TEMPLATE
from cookiecutter.main import cookiecutter
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.slow

UV = str(Path(sys.executable).parent / "uv")
KEPT_OUT = ["torch", "torchvision"]


def closure(names):
    """These installed distributions and, recursively, what they require here (markers evaluated)."""
    seen, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def link_kept_out(site, low_python):
    """Links to torch, torchvision and the dependencies of theirs the low venv lacks; a .pth to them."""
    have = json.loads(
        subprocess.run(
            [UV, "pip", "list", "--python", low_python, "--format", "json"], capture_output=True, text=True
        ).stdout
    )
    installed = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in have}
    folder = site.parent / "tested-torch"
    folder.mkdir()
    for name, dist in closure(KEPT_OUT).items():
        if name in installed:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    (site / "tested_torch.pth").write_text(f"{folder}\n")


def test_fast_tests_pass_with_the_lowest_allowed_versions(tmp_path):
    project = Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(tmp_path)))
    venv = tmp_path / "lowest"
    subprocess.run([UV, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = str(venv / "bin" / "python")
    override = tmp_path / "override.txt"
    override.write_text("".join(f'{name} ; sys_platform == "never"\n' for name in KEPT_OUT))
    install = subprocess.run(
        [UV, "pip", "install", "--python", python, "--resolution", "lowest-direct"]
        + ["--override", str(override), "-e", ".[dev,all]"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    link_kept_out(site, python)
    versions = subprocess.run(
        [
            python,
            "-c",
            "import numpy, torch, hydra; print(numpy.__version__, torch.__version__, hydra.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    assert versions.returncode == 0, versions.stderr
    numpy_version, torch_version, hydra_version = versions.stdout.split()
    # really the lowest: the versions are the pyproject's lower bounds
    bounds = {
        Requirement(d).name: min(Version(s.version) for s in Requirement(d).specifier if s.operator == ">=")
        for d in tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert Version(numpy_version) == bounds["numpy"], versions.stdout
    assert Version(hydra_version) == bounds["hydra-core"], versions.stdout
    assert torch_version.split("+")[0] == metadata.version("torch")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    tests = subprocess.run(
        [python, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE"],
        cwd=project,
        env=env | {"WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lowest = install.stderr[-3000:]
    # the failures' short summary first: a long traceback must not push it out of CI's log
    summary = [line for line in tests.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert tests.returncode == 0, (
        "\n".join(summary) + "\n" + tests.stdout[-8000:] + tests.stderr[-2000:] + "\ninstalled:\n" + lowest
    )
