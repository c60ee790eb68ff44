"""Bake the default and an option matrix; check that every variant is complete, rendered and consistent."""

import ast
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import MATRIX, TEMPLATE, make_targets, text_files
from cookiecutter.main import cookiecutter

ALWAYS = [
    "README.md",
    "pyproject.toml",
    "constraints.txt",
    ".cookiecutter.json",
    "Makefile",
    ".gitignore",
    ".pre-commit-config.yaml",
    "configs/config.yaml",
    "configs/logger/none.yaml",
    "configs/experiment/default.yaml",
    "1_planning/CHECKLIST.md",
    "1_planning/PLAN.md",
    "1_planning/requirements.yaml",
    "2_data/CHECKLIST.md",
    "3_training/CHECKLIST.md",
    "4_debugging/CHECKLIST.md",
    "4_debugging/FAILURE_MODES.md",
    "5_deployment/CHECKLIST.md",
    "6_metric_review/CHECKLIST.md",
    "src/{pkg}/__init__.py",
    "src/{pkg}/planning.py",
    "src/{pkg}/metric_review.py",
    "src/{pkg}/debugging/error_analysis.py",
    "src/{pkg}/debugging/probes.py",
    "src/{pkg}/debugging/doctor.py",
    "src/{pkg}/debugging/screen.py",
    "src/{pkg}/debugging/fixes.py",
    "src/{pkg}/debugging/engine.py",
    "src/{pkg}/debugging/causes.py",
    "src/{pkg}/debugging/report.py",
    "src/{pkg}/debugging/lab.py",
    "src/{pkg}/debugging/runs.py",
    "src/{pkg}/debugging/stats.py",
    "src/{pkg}/task.py",
    "src/{pkg}/training.py",
    "src/{pkg}/evaluation.py",
    "src/{pkg}/checkpoints.py",
    "configs/training/cpu.yaml",
    "docs/your-task.md",
    "tests",
]
EXAMPLE = [
    "src/{pkg}/data/capture.py",
    "src/{pkg}/data/bop.py",
    "src/{pkg}/data/crop.py",
    "src/{pkg}/data/models.py",
    "src/{pkg}/data/qa.py",
    "src/{pkg}/data/qa_scene.py",
    "src/{pkg}/data/render.py",
    "src/{pkg}/data/scenes.py",
    "src/{pkg}/data/detections.py",
    "src/{pkg}/pose/geometry.py",
    "src/{pkg}/pose/model.py",
    "src/{pkg}/pose/losses.py",
    "src/{pkg}/pose/metrics.py",
    "src/{pkg}/pose/task.py",
    "configs/task/pose.yaml",
    "src/{pkg}/deployment/export.py",
    "src/{pkg}/deployment/serve.py",
    "src/{pkg}/deployment/inputs.py",
    "configs/data/synthetic.yaml",
    "configs/data/scenes.yaml",
    "configs/experiment/smoke.yaml",
    "configs/experiment/scenes_smoke.yaml",
    "configs/experiment/baseline.yaml",
    "configs/experiment/zoo",
    "configs/experiment/zoo_test",
    "2_data/LABELING.md",
    "tests/example",
]
OPTIONAL = {
    ("use_dvc", "yes"): ["dvc.yaml", "params.yaml", ".dvcignore"],
    ("use_wandb", "yes"): ["configs/logger/wandb.yaml"],
    ("ci", "github-actions"): [".github/workflows/ci.yml"],
}
DEFAULTS = json.loads((TEMPLATE / "cookiecutter.json").read_text())
# Python sources are copied unrendered (f-strings may hold "{{"), so only template tags count there.
UNRENDERED = re.compile(r"(?<!\$)\{\{|\{%|\{#|cookiecutter\.")
UNRENDERED_PY = re.compile(r"\{\{\s*cookiecutter|\{%-?\s|cookiecutter\.\w")


def answers(extra):
    chosen = {
        key: (value[0] if isinstance(value, list) else value)
        for key, value in DEFAULTS.items()
        if not key.startswith("_") and "{{" not in str(value)
    }
    chosen.update(extra)
    return chosen


@pytest.fixture(scope="module", params=list(MATRIX), ids=list(MATRIX))
def baked(request, tmp_path_factory):
    """One bake per matrix row, shared by the checks below."""
    out = tmp_path_factory.mktemp(request.param)
    extra = MATRIX[request.param]
    project = cookiecutter(str(TEMPLATE), no_input=True, extra_context=extra, output_dir=str(out))
    return Path(project), answers(extra)


def expected_paths(chosen, project):
    pkg = next(p.name for p in (project / "src").iterdir() if p.is_dir())
    present = list(ALWAYS)
    absent = []
    (present if chosen["include_example"] == "yes" else absent).extend(EXAMPLE)
    for (option, value), paths in OPTIONAL.items():
        (present if chosen[option] == value else absent).extend(paths)
    (present if chosen["license"] != "none" else absent).append("LICENSE")
    return [p.format(pkg=pkg) for p in present], [p.format(pkg=pkg) for p in absent]


def test_file_set(baked):
    project, chosen = baked
    present, absent = expected_paths(chosen, project)
    missing = [p for p in present if not (project / p).exists()]
    extra = [p for p in absent if (project / p).exists()]
    assert not missing, f"missing: {missing}"
    assert not extra, f"opted out but present: {extra}"


def test_names_follow_answers(baked):
    project, chosen = baked
    expected_slug = chosen["project_name"].lower().strip().replace(" ", "-").replace("_", "-")
    assert project.name == chosen.get("project_slug", expected_slug)
    package = chosen.get("package_name", project.name.replace("-", "_"))
    assert (project / "src" / package / "__init__.py").exists()
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == project.name
    assert pyproject["project"]["requires-python"] == f">={chosen['python_version']}"
    installed = setup_installs(pyproject["project"])
    assert ("wandb" in installed) == (chosen["use_wandb"] == "yes")
    assert ("dvc" in installed) == (chosen["use_dvc"] == "yes")
    assert ("roma" in installed) == (chosen["include_example"] == "yes")
    assert ("mitsuba" in installed) == (chosen["include_example"] == "yes")
    recorded = json.loads((project / ".cookiecutter.json").read_text())
    assert {key: recorded[key] for key in chosen} == chosen


def test_nothing_unrendered(baked):
    project, _ = baked
    leftovers = [
        f"{path.relative_to(project)}:{n}: {line.strip()}"
        for path, text in text_files(project)
        for n, line in enumerate(text.splitlines(), 1)
        if (UNRENDERED_PY if path.suffix == ".py" else UNRENDERED).search(line)
    ]
    assert not leftovers, "\n".join(leftovers[:20])
    named = [p for p in project.rglob("*") if "{{" in p.name or "cookiecutter" in p.name]
    assert [p.relative_to(project) for p in named] == [Path(".cookiecutter.json")]


def test_yaml_and_toml_parse(baked):
    project, _ = baked
    for path, text in text_files(project):
        if path.suffix in {".yaml", ".yml"}:
            yaml.safe_load(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)


def test_python_compiles_and_ruff_is_clean(baked, tmp_path):
    project, _ = baked
    for path in project.rglob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    ruff = [sys.executable, "-m", "ruff"]
    check = subprocess.run([*ruff, "check", "."], cwd=project, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([*ruff, "format", "--check", "."], cwd=project, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_readme_commands_exist(baked):
    """Every `make <target>` named in any markdown file is a target of the Makefile (no dead references)."""
    project, _ = baked
    targets = make_targets((project / "Makefile").read_text())
    named = {
        (path.relative_to(project), target)
        for path, text in text_files(project)
        if path.suffix == ".md"
        for target in re.findall(r"(?:`|^\s*)make ([a-z][a-z0-9-]*)", text, flags=re.M)
    }
    dead = sorted(f"{where}: make {target}" for where, target in named if target not in targets)
    assert not dead, dead


def test_ci_runs_the_readme_quick_start(baked):
    """The baked CI runs the README's quick start (setup, test, smoke pipeline, review) as written."""
    project, chosen = baked
    readme = (project / "README.md").read_text()
    assert "make test" in readme
    workflow = project / ".github/workflows/ci.yml"
    if chosen["ci"] != "github-actions":
        return
    ci = yaml.safe_load(workflow.read_text())
    runs = [step.get("run", "").strip() for step in ci["jobs"]["test"]["steps"]]
    quick_start = re.search(r"## Quick start\n+```bash\n(.*?)```", readme, flags=re.S).group(1)
    for command in [re.sub(r"\s+#.*", "", line).strip() for line in quick_start.splitlines()]:
        assert not command or command in runs, f"CI does not run `{command}`: {runs}"
    assert "${{ github.workflow }}" in workflow.read_text()
    assert "download.pytorch.org/whl/cpu" in ci["jobs"]["test"]["env"]["PIP_EXTRA_INDEX_URL"]
    update = yaml.safe_load((project / ".github/workflows/template-update.yml").read_text())
    assert "cruft update" in " ".join(step.get("run", "") for step in update["jobs"]["update"]["steps"])


def test_ci_slow_subset_selects_existing_tests(baked):
    """The baked CI's `-k` picks each named slow test (SIGKILL resume, one zoo config, the server fuzz)."""
    project, chosen = baked
    if chosen["ci"] != "github-actions" or chosen["include_example"] != "yes":
        return
    ci = yaml.safe_load((project / ".github/workflows/ci.yml").read_text())
    steps = [s for s in ci["jobs"]["test"]["steps"] if "-m slow" in s.get("run", "")]
    assert len(steps) == 1, "the baked CI must run the slow subset in one step (`pytest -m slow -k ...`)"
    (step,) = steps
    assert not step.get("continue-on-error") and "if" not in step, f"the slow subset must gate CI: {step}"
    command = step["run"]
    expression = re.search(r'-k "([^"]+)"', command).group(1)
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    result = subprocess.run(
        [*collect, "-m", "slow", "-k", expression], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    selected = [line for line in result.stdout.splitlines() if "::" in line]
    for name in ["sigkill", "reduced_zoo_end_to_end[lr_too_high", "real_server"]:
        assert sum(name in line for line in selected) == 1, (name, selected)


def test_hydra_config_composes_for_every_experiment(baked):
    """The config tree composes with every shipped experiment, and every interpolation resolves."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    project, _ = baked
    config_dir = project / "configs"
    experiments = sorted(
        str(p.relative_to(config_dir / "experiment").with_suffix(""))
        for p in (config_dir / "experiment").rglob("*.yaml")
    )
    assert "default" in experiments
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        for name in experiments:
            cfg = compose(config_name="config", overrides=[f"experiment={name}"])
            OmegaConf.resolve(cfg)
            assert cfg.paths.training.endswith("3_training")


def test_make_repo_creates_git_and_dvc_once(baked, tmp_path):
    """The bake has no repository (cruft-safe hook); `make repo` (run by `make setup`) creates git, DVC with
    its local remote and one initial commit, and a second run changes nothing."""
    project, chosen = baked
    copy = tmp_path / project.name
    shutil.copytree(project, copy)
    assert not (copy / ".git").exists() and not (copy / ".dvc").exists()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(2):
        result = subprocess.run(
            ["make", "repo", "PYTHON=python"], cwd=copy, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
    log = subprocess.run(["git", "log", "--oneline"], cwd=copy, capture_output=True, text=True)
    assert log.returncode == 0 and len(log.stdout.splitlines()) == 1, log.stdout + log.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True)
    assert status.stdout == "", status.stdout
    assert (copy / ".dvc").exists() == (chosen["use_dvc"] == "yes")
    if chosen["use_dvc"] == "yes":
        config = (copy / ".dvc/config").read_text()
        assert "remote = local" in config and f"{project.name}-dvc-storage" in config


def name_of(requirement):
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def setup_installs(project_table):
    """Distributions `make setup` installs (`.[dev,all]`): the core, `dev`, and the extras `all` names."""
    extras = project_table.get("optional-dependencies", {})
    wanted, names, seen = ["dev", "all"], {name_of(d) for d in project_table["dependencies"]}, set()
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in extras[extra]:
            self_reference = re.fullmatch(rf"{re.escape(project_table['name'])}\[(.+)\]", requirement)
            if self_reference:
                wanted.extend(e.strip() for e in self_reference.group(1).split(","))
            else:
                names.add(name_of(requirement))
    return names


def test_make_setup_installs_dev_and_all_with_the_pinned_constraints(baked):
    project, _ = baked
    makefile = (project / "Makefile").read_text()
    setup = makefile.split("\nsetup:", 1)[1].split("\n\n", 1)[0]
    assert "-c constraints.txt -e '.[dev,all]'" in setup, setup
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    installed = setup_installs(pyproject)
    pins = {
        name_of(line): line.split("==")[1].split(";")[0].strip()
        for line in (project / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert set(pins) <= installed, f"pinned but never installed: {set(pins) - installed}"
    assert installed - set(pins) <= {"torch", "torchvision", "pydantic"}, installed - set(pins)
    # the pins are the versions the template's own tests run with
    dev = {
        name_of(line): line.split("==")[1].strip()
        for line in (TEMPLATE / "requirements-dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert {name: version for name, version in pins.items() if dev.get(name) != version} == {}


DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "hydra": "hydra-core", "drjit": "mitsuba"}


def test_every_import_is_a_declared_dependency(baked):
    """`make setup` (`pip install -e '.[dev,all]'`) brings every module the project code and tests import."""
    project, chosen = baked
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    declared = setup_installs(pyproject)
    # the package, and the tests' own modules (conftest, a test module reusing another's data writer)
    local = {p.name for p in (project / "src").iterdir()} | {p.stem for p in project.glob("tests/**/*.py")}
    # tracking.py imports wandb only when logger=wandb, a config that exists only with use_wandb=yes, and
    # dvclive (and scmrepo, for the git check before it) only when the `dvclive` key of configs/config.yaml
    # (use_dvc=yes) is set
    optional = {"wandb"} if chosen["use_wandb"] == "no" else set()
    optional |= {"dvclive", "scmrepo"} if chosen["use_dvc"] == "no" else set()
    missing = set()
    for path in [*project.glob("src/**/*.py"), *project.glob("tests/**/*.py")]:
        tree = ast.parse(path.read_text())
        # `try: import x / except ImportError:` is an optional import with a fallback: not required
        guarded = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try)
            and any(
                ast.unparse(h.type or ast.Name("")) in {"ImportError", "ModuleNotFoundError"}
                for h in node.handlers
            )
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in local or top in optional:
                    continue
                if DISTRIBUTION.get(top, top).lower().replace("_", "-") not in declared:
                    missing.add(f"{top} ({path.relative_to(project)})")
    assert not missing, sorted(missing)
