"""No dangling references: a bake mentions nothing that it lacks.

Every row of the option matrix is baked and each of its text files is scanned for what that bake opted
out of: wandb (use_wandb=no), DVC and its commands (use_dvc=no), and whatever the example's prune removed
(include_example=no). What is forbidden comes from the bakes themselves, not from a hand-kept list: a file
of the full (default) bake that this bake lacks may not be named, nor its module, experiment or make target.
"""

import re
from pathlib import Path

import pytest
from conftest import MATRIX, TEMPLATE, make_targets, text_files
from cookiecutter.main import cookiecutter

# Words a removed file stands for, beyond its own name (the example's tools and formats).
VOCABULARY = {
    "data/capture.py": [r"mitsuba"],
    "data/bop.py": [r"\bBOP\b"],
    "deployment/export.py": [r"\bonnx"],
    "debugging/zoo.py": [r"\bzoo\b", r"bug zoo"],
}
OPT_OUTS = {
    "use_wandb": [r"wandb", r"weights\s*(&|and)\s*biases"],
    "use_dvc": [r"\bdvc\b", r"dvclive", r"make pipeline"],
}
# Files allowed to name what the bake lacks, per kind of check ("use_wandb", "use_dvc": the opt-out's words;
# "removed": a file, module, experiment or make target of the full bake that this one lacks).
EXEMPT = {
    # src/ is copied unrendered (no Jinja): it keeps optional backends it imports only when the config says so
    "src/{pkg}/tracking.py": {"use_wandb", "use_dvc"},
    "src/{pkg}/metric_review.py": {"use_dvc"},  # `dvc metrics diff` only inside a DVC repo
    "src/{pkg}/evaluation.py": {"use_wandb", "use_dvc"},  # its docstring's CSVs are DVC-plot ready
    "src/{pkg}/paths.py": {"use_dvc"},
    # asserts that the example's package is NOT imported by the generic stages
    "tests/test_planning.py": {"removed"},
    # Left to their owners (issue 11 / the example-off project): the doctor's reference table and the bug-zoo
    # benchmark; the session fixture that renders a tiny dataset with the example's capture; the baked CI.
    "4_debugging/FAILURE_MODES.md": {"removed"},
    "tests/conftest.py": {"removed"},
    ".github/workflows/ci.yml": {"use_wandb"},
    # the recorded answers (for cruft): they name every option, opted out or not
    ".cookiecutter.json": {"use_wandb", "use_dvc", "removed"},
    # the example's own evaluation and test: present only with the example, they name its optional backends
    "src/{pkg}/pose/evaluation.py": {"use_wandb", "use_dvc"},
    "tests/example/test_capture.py": {"use_wandb"},
}


@pytest.fixture(scope="module")
def bakes(tmp_path_factory):
    out = tmp_path_factory.mktemp("references")
    bake = {
        name: cookiecutter(str(TEMPLATE), no_input=True, extra_context=extra, output_dir=str(out / name))
        for name, extra in MATRIX.items()
    }
    return {name: Path(project) for name, project in bake.items()}


def package(project):
    return next(p.name for p in (project / "src").iterdir() if p.is_dir())


def files(project):
    """Relative paths, the package folder written as {pkg} so bakes with other names compare."""
    src = f"src/{package(project)}/"
    return {
        str(path.relative_to(project)).replace(src, "src/{pkg}/")
        for path in project.rglob("*")
        if ".git" not in path.parts
    }


def removed_patterns(full, project):
    """Patterns naming what the full bake has and this one lacks: files, modules, experiments, targets."""
    pkg = package(project)
    gone = files(full) - files(project)
    patterns = {}
    for path in sorted(gone):
        local = path.removeprefix("src/{pkg}/")
        path = path.replace("{pkg}", pkg)
        patterns[re.escape(path)] = path
        if path.endswith(".py") and path.startswith("src/"):
            module = local.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            patterns[rf"\b{re.escape(pkg)}\.{re.escape(module)}\b"] = path
            patterns[rf"(?<![\w/]){re.escape(local)}"] = path
        if path.startswith("configs/experiment/") and path.endswith(".yaml"):
            name = path.removeprefix("configs/experiment/").removesuffix(".yaml")
            patterns[rf"experiment=['\"]?{re.escape(name)}\b"] = path
        for word in VOCABULARY.get(local, []):
            patterns[word] = path
    full_targets = make_targets((full / "Makefile").read_text())
    for target in sorted(full_targets - make_targets((project / "Makefile").read_text())):
        patterns[rf"\bmake {re.escape(target)}\b"] = f"make target {target}"
    return patterns


def removed_by(what):
    """The kind of check a removed file belongs to: its opt-out's when it is DVC's or wandb's own."""
    if re.search(r"dvc|params\.yaml|make target pipeline", what):
        return "use_dvc"
    return "use_wandb" if "wandb" in what else "removed"


def dangling(full, project, chosen):
    """file:line: text  (what it names) for every mention of something this bake lacks."""
    pkg = package(project)
    checks = {pattern: (removed_by(why), why) for pattern, why in removed_patterns(full, project).items()}
    for option, patterns in OPT_OUTS.items():
        if chosen.get(option) == "no":
            checks |= {pattern: (option, f"{option}=no") for pattern in patterns}
    exempt = {where.format(pkg=pkg): kinds for where, kinds in EXEMPT.items()}
    found = []
    for path, text in text_files(project):
        where = str(path.relative_to(project))
        for n, line in enumerate(text.splitlines(), 1):
            for pattern, (kind, why) in checks.items():
                if kind not in exempt.get(where, ()) and re.search(pattern, line, flags=re.I):
                    found.append(f"{where}:{n}: {line.strip()[:120]}  ({why})")
                    break
    return found


@pytest.mark.parametrize("row", [name for name in MATRIX if name != "default"])
def test_no_reference_to_what_the_bake_lacks(bakes, row):
    chosen = {"include_example": "yes", "use_wandb": "yes", "use_dvc": "yes"} | MATRIX[row]
    found = dangling(bakes["default"], bakes[row], chosen)
    assert not found, f"{len(found)} dangling reference(s):\n" + "\n".join(found)


def test_the_scan_finds_a_planted_reference(bakes, tmp_path):
    """The scan is not blind: a line naming the pruned smoke experiment in a bare bake is reported."""
    import shutil

    project = tmp_path / "bare"
    shutil.copytree(bakes["bare-dvc"], project, ignore=shutil.ignore_patterns(".git", ".dvc"))
    with (project / "README.md").open("a") as readme:
        readme.write("\nTry `make train EXPERIMENT=smoke` with wandb.\n")
    chosen = {"include_example": "no", "use_wandb": "no", "use_dvc": "yes"}
    found = dangling(bakes["default"], project, chosen)
    assert [f for f in found if f.startswith("README.md:") and "EXPERIMENT=smoke" in f]
