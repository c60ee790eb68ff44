"""Prune what the user opted out of, then `git init` (+ `dvc init`) and make the initial commit.

Missing git or dvc never fails the bake: the next steps are printed instead.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "{{ cookiecutter.package_name }}"
OPTIONS = {
    "include_example": "{{ cookiecutter.include_example }}",
    "use_wandb": "{{ cookiecutter.use_wandb }}",
    "use_dvc": "{{ cookiecutter.use_dvc }}",
    "ci": "{{ cookiecutter.ci }}",
    "license": "{{ cookiecutter.license }}",
}
# The embedded default DVC remote: a folder beside the project. Replace with S3/GCS/... to share data.
DVC_REMOTE = "../{{ cookiecutter.project_slug }}-dvc-storage"
AUTHOR = ("{{ cookiecutter.author_name }}", "{{ cookiecutter.author_email }}")

SRC = f"src/{PACKAGE}"
# Everything that belongs to the worked 6D pose example. With include_example=no the project keeps the
# lifecycle folders, checklists and the generic core that runs any task.Task: planning, training, evaluation,
# the doctor (engine and probes), error analysis, metric review (docs/your-task.md says what to write).
EXAMPLE = [
    f"{SRC}/data",
    f"{SRC}/pose",
    f"{SRC}/deployment",
    f"{SRC}/benchmark.py",
    f"{SRC}/loop_benchmark.py",
    f"{SRC}/debugging/zoo.py",
    f"{SRC}/debugging/zoo_benchmark.py",
    "configs/task/pose.yaml",
    "configs/data",
    "configs/model",
    "configs/loss",
    "configs/training/gpu.yaml",
    "configs/deployment",
    "configs/hydra",
    "configs/experiment/smoke.yaml",
    "configs/experiment/baseline.yaml",
    "configs/experiment/gpu.yaml",
    "configs/experiment/zoo",
    "2_data/LABELING.md",
    "5_deployment/README.md",
    "tests/example",
]
PRUNE = {
    "include_example": EXAMPLE,
    "use_wandb": ["configs/logger/wandb.yaml"],
    "use_dvc": ["dvc.yaml", "params.yaml", ".dvcignore"],
    "ci": [".github"],
    "license": ["LICENSE"],
}


def prune():
    for option, paths in PRUNE.items():
        if OPTIONS[option] not in ("no", "none"):
            continue
        for path in map(Path, paths):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def dvc_command():
    """`dvc` on PATH, else the dvc installed beside cookiecutter (e.g. in the same venv), else None."""
    if shutil.which("dvc"):
        return [shutil.which("dvc")]
    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc"]
    return None


def init_repositories():
    steps = []
    if shutil.which("git") is None:
        print("git was not found: run `git init && git add -A && git commit -m 'Initial commit'` later.")
        return
    run("git", "init", "-q")
    run("git", "symbolic-ref", "HEAD", "refs/heads/main")
    dvc = dvc_command()
    if OPTIONS["use_dvc"] == "yes":
        if dvc is None:
            steps.append(f"pip install dvc && dvc init && dvc remote add -d local {DVC_REMOTE}")
        else:
            run(*dvc, "init", "-q")
            run(*dvc, "config", "core.analytics", "false")
            run(*dvc, "remote", "add", "-d", "local", DVC_REMOTE)
    run("git", "add", "-A")
    identity = []
    if subprocess.run(["git", "config", "user.email"], capture_output=True).returncode != 0:
        identity = ["-c", f"user.name={AUTHOR[0]}", "-c", f"user.email={AUTHOR[1]}"]
    try:
        run("git", *identity, "commit", "-q", "-m", "Initial commit from cookiecutter-dl-lifecycle")
    except subprocess.CalledProcessError as error:
        steps.append(f"git commit -m 'Initial commit'   (git said: {error.stderr.strip()})")
    if steps:
        print("Next steps:\n  " + "\n  ".join(steps))


def main():
    prune()
    try:
        init_repositories()
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        print(f"Could not initialise the repository ({detail}); run `git init` (and `dvc init`) yourself.")
    print(f"Created {Path.cwd().name}: cd {Path.cwd().name} && make setup && make test")


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    main()
