"""The README's quick start, run as a newcomer runs it: read from the README, in a fresh environment.

A venv holding only cookiecutter (installed from the registry by the README's own command) bakes the
project; then the baked README's quick-start commands run in the baked project, whose `make setup` builds
the project's venv from its own pyproject.toml and constraints.txt alone. Nothing of the template's dev
venv is on PATH. The commands come from the READMEs' code blocks, so docs and test cannot drift.

Environment the test sets (not commands): HOME (a scratch home, so `~` and git's identity are a
newcomer's), PIP_CONSTRAINT (the template's constraints.txt: torch from the local pins, as CI does) and
PIP_CACHE_DIR (the machine's pip cache, so the second venv reuses the first's downloads).
"""

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TEMPLATE, newcomer_env
from cookiecutter.main import cookiecutter

PLACEHOLDER = "gh:<org>/cookiecutter-dl-lifecycle"
BAKES = {"default": [], "example-off": ["include_example=no"]}
ARTIFACTS = ["2_data/qa/report.md", "4_debugging/error_analysis/report.md", "5_deployment/model.onnx"]
METRIC_KEYS = {"re_deg_median", "te_cm_median", "add_01d", "adds_01d", "adds_auc", "acc_5deg5cm"}


def code_block(markdown, heading):
    """The commands of the first ```bash block after `heading`: comments and blank lines dropped."""
    section = markdown.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [command for command in commands if command]


def template_quick_start():
    """The top-level README's block, split at its `cd`: (install and bake, the project's quick start)."""
    commands = code_block((TEMPLATE / "README.md").read_text(), "## Use it")
    cd = next(i for i, command in enumerate(commands) if command.startswith("cd "))
    return commands[: cd + 1], commands[cd + 1 :]


@dataclass
class Step:
    command: str
    seconds: float
    returncode: int
    output: str


@dataclass
class QuickStart:
    name: str
    project: Path
    env: dict
    steps: list = field(default_factory=list)

    def run(self, command, cwd):
        start = time.monotonic()
        result = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", command],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        step = Step(command, time.monotonic() - start, result.returncode, result.stdout + result.stderr)
        self.steps.append(step)
        return step

    def ok(self):
        failed = next((s for s in self.steps if s.returncode != 0), None)
        assert failed is None, f"`{failed.command}` exited {failed.returncode}:\n{failed.output[-6000:]}"

    def output_of(self, prefix):
        return next(s.output for s in self.steps if s.command.startswith(prefix))

    def ran(self, prefix):
        return any(s.command.startswith(prefix) for s in self.steps)


@pytest.fixture(scope="module", params=list(BAKES), ids=list(BAKES))
def quickstart(request, tmp_path_factory):
    """Run the whole quick start once per bake; the tests below read what it did. Stops at a failure."""
    work = tmp_path_factory.mktemp(f"newcomer-{request.param}")
    (work / "home").mkdir()
    qs = QuickStart(request.param, Path(), newcomer_env(work / "home"))
    install_and_bake, _ = template_quick_start()
    cwd = work
    for command in install_and_bake:
        if command.startswith("cd "):
            cwd = cwd / command[3:].strip()
            continue
        if PLACEHOLDER in command:  # the one substitution: this checkout instead of GitHub, no prompts
            command = command.replace(PLACEHOLDER, " ".join([str(TEMPLATE), "--no-input", *BAKES[qs.name]]))
        if qs.run(command, cwd).returncode != 0:
            break
    else:
        qs.project = cwd
        run_readme_quick_start(qs, cwd)
    yield qs
    # each bake's venvs hold a torch install (GBs): gone once its tests have read them, pass or fail
    shutil.rmtree(work, ignore_errors=True)


def run_readme_quick_start(qs, cwd):
    for command in code_block((cwd / "README.md").read_text(), "## Quick start"):
        if qs.run(command, cwd).returncode != 0:
            break
    total = sum(s.seconds for s in qs.steps)
    timings = "\n".join(f"  {s.seconds:7.1f} s  {s.command}" for s in qs.steps)
    print(f"\nquick start ({qs.name}): {total:.0f} s from the cookiecutter install\n{timings}")


@pytest.mark.slow
def test_quick_start_runs_as_written(quickstart):
    quickstart.ok()
    project = quickstart.project
    home = Path(quickstart.env["HOME"])
    # the bake came from a venv holding cookiecutter and its dependencies only
    listed = subprocess.run(
        [*home.glob(".venvs/*/bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        env=quickstart.env,
    )
    cookiecutter_venv = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "cookiecutter" in cookiecutter_venv and not {"torch", "dvc", "hydra-core"} & cookiecutter_venv
    assert " passed" in quickstart.output_of("make test")
    log = subprocess.run(["git", "log", "--oneline"], cwd=project, capture_output=True, text=True)
    assert log.stdout.count("\n") == 1, log.stdout + log.stderr
    answers = json.loads((project / ".cookiecutter.json").read_text())
    assert answers["include_example"] == ("no" if BAKES[quickstart.name] else "yes")
    if (project / "dvc.yaml").exists():
        assert "remote = local" in (project / ".dvc/config").read_text()
    if quickstart.ran("make pipeline"):
        metrics = json.loads((project / "3_training/metrics.json").read_text())
        assert METRIC_KEYS <= metrics.keys(), metrics.keys()
        header = (project / "3_training/predictions.csv").read_text().splitlines()[0]
        assert header == "scene_id,im_id,obj_id,score,R,t,time"
        for artifact in ARTIFACTS:
            assert (project / artifact).exists(), artifact
        dvc = [str(project / ".venv/bin/python"), "-m", "dvc"]
        status = subprocess.run([*dvc, "status", "--json"], cwd=project, capture_output=True, text=True)
        # up to date, but for the review stage's outputs, which `make review` (the gate) rewrites by design
        assert set(json.loads(status.stdout or "{}")) <= {"review"}, status.stdout + status.stderr
    if quickstart.ran("make review"):
        review = json.loads((project / "6_metric_review/review.json").read_text())
        assert "re_deg_median" in json.dumps(review), review
        assert "re_deg_median" in (project / "6_metric_review/review.md").read_text()
    if quickstart.name == "default":
        assert quickstart.ran("make pipeline EXPERIMENT=smoke") and quickstart.ran("make review")


@pytest.mark.slow
def test_full_test_suite_in_the_projects_own_venv(quickstart):
    """The whole suite in the venv `make setup` built from the baked pyproject alone: the quick start's
    `make test` ran the fast tests there, `make test-slow` runs the end-to-end ones (together `make test-all`,
    without running the fast tests twice)."""
    quickstart.ok()
    assert " passed" in quickstart.output_of("make test")
    step = quickstart.run("make test-slow", quickstart.project)
    print(f"\nmake test-slow ({quickstart.name}, in the project's own venv): {step.seconds:.0f} s")
    assert step.returncode == 0, step.output[-8000:]
    has_example = (quickstart.project / "src").glob("*/pose")
    assert (" passed" if any(has_example) else " 0 selected") in step.output, step.output[-3000:]


def test_template_readme_runs_the_baked_readmes_quick_start(tmp_path):
    """After `cd`, the top-level README runs exactly the default bake's quick start, in its order."""
    install_and_bake, project_commands = template_quick_start()
    assert any(PLACEHOLDER in command for command in install_and_bake)
    assert install_and_bake[0].split("&&")[-1].strip().endswith("pip install cookiecutter")
    project = Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(tmp_path)))
    assert install_and_bake[-1] == f"cd {project.name}"
    assert project_commands == code_block((project / "README.md").read_text(), "## Quick start")
