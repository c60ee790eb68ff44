"""Prune what the user opted out of. Nothing else: the repositories are `make setup`'s job.

Why no `git init` / `dvc init` here: cruft re-runs this hook inside temporary bakes on every `cruft diff`
and `cruft update` (cruft issues #155, #199); a `.git/` created there ends up in the diff and breaks the
update. And dvc, if it is installed at all, lives in the project's own venv, which exists only after
`make setup`. So `make setup` (its `repo` step) creates the git repository, the DVC repository with its
local remote and the initial commit, idempotently, with the venv's dvc; the bake is the same whatever
tools sit beside cookiecutter.
"""

import shutil
from pathlib import Path

PACKAGE = "{{ cookiecutter.package_name }}"
OPTIONS = {
    "include_example": "{{ cookiecutter.include_example }}",
    "use_wandb": "{{ cookiecutter.use_wandb }}",
    "use_dvc": "{{ cookiecutter.use_dvc }}",
    "ci": "{{ cookiecutter.ci }}",
    "license": "{{ cookiecutter.license }}",
}
SRC = f"src/{PACKAGE}"
# Everything that belongs to the worked 6D pose example. With include_example=no the project keeps the
# lifecycle folders, checklists and the generic core that runs any task.Task: planning, training, evaluation,
# the doctor (engine and probes), error analysis, metric review (docs/your-task.md says what to write).
EXAMPLE = [
    f"{SRC}/data",
    f"{SRC}/pose",
    f"{SRC}/deployment",
    f"{SRC}/benchmark.py",
    f"{SRC}/scenes_benchmark.py",
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
    "configs/experiment/scenes_smoke.yaml",
    "configs/experiment/baseline.yaml",
    "configs/experiment/gpu.yaml",
    "configs/experiment/zoo",
    "configs/experiment/zoo_test",
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


def main():
    prune()
    print(f"Created {Path.cwd().name}: cd {Path.cwd().name} && make setup && make test")


if __name__ == "__main__":
    main()
