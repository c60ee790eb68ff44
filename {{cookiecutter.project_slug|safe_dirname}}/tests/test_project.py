"""The project's own wiring: every stage command exists, composes the config tree and is documented."""

import importlib
import re
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import compose
from {{ cookiecutter.package_name }} import tracking
from {{ cookiecutter.package_name }}.paths import CONFIG_DIR, PROJECT_ROOT

MAKEFILE = (PROJECT_ROOT / "Makefile").read_text()
STAGE_FOLDERS = ["1_planning", "2_data", "3_training", "4_debugging", "5_deployment", "6_metric_review"]


def make_commands():
    """(target, module) for every Make target that runs `python -m $(PKG).<module>`."""
    return re.findall(
        r"^([a-z-]+):.*\n(?:\t.*\n)*?\t\$\(PYTHON\) -m \$\(PKG\)\.([\w.]+)", MAKEFILE, flags=re.M
    )


def experiments():
    root = Path(CONFIG_DIR) / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def test_without_an_experiment_the_name_is_default():
    assert tracking.experiment_name(compose()) == "default"


{%- if cookiecutter.use_wandb == "yes" %}


def test_wandb_runs_are_named_after_the_experiment(monkeypatch, tmp_path):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    cfg = compose("logger=wandb", "experiment_name=mine", f"paths.root={tmp_path}")
    tracking.start_run(cfg, "evaluation")
    assert calls[0]["name"] == "mine-evaluation"
{%- endif %}

{%- if cookiecutter.use_dvc == "yes" %}


def test_dvclive_in_a_git_repository_without_commits_is_a_clear_error(monkeypatch, tmp_path):
    """After a bare `git init` (no commit yet) dvclive would die deep inside scmrepo and leave a `.dvc`
    behind; the stage stops first, naming the repository and the way out. With a commit it logs."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    cfg = compose(f"paths.root={tmp_path}", "logger=none")
    with pytest.raises(RuntimeError, match="without commits.*make repo"):
        tracking.start_run(cfg, "training")
    assert not (tmp_path / ".dvc").exists()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first"]
    subprocess.run(git, check=True)
    run = tracking.start_run(cfg, "training")
    run.log({"train/loss": 1.0}, step=0)
    run.finish()
    assert (tmp_path / "3_training" / "dvclive" / "metrics.json").is_file()
{%- endif %}


def test_every_stage_folder_has_a_checklist():
    for folder in STAGE_FOLDERS:
        assert (PROJECT_ROOT / folder / "CHECKLIST.md").is_file(), folder


@pytest.mark.parametrize("target, module", make_commands())
def test_make_target_runs_a_module_composing_the_config_tree(target, module, monkeypatch, capsys, tmp_path):
    """The module `make <target>` runs is a Hydra app over configs/: asked for its job config (Hydra's
    `--cfg job`, which runs nothing), it prints exactly what `compose` builds from the same overrides."""
    overrides = ["logger=none", "seed=7", f"paths.root={tmp_path}"]
    expected = OmegaConf.to_container(compose(*overrides))
    app = importlib.import_module(f"{{ cookiecutter.package_name }}.{module}")
    try:
        if module == "debugging.zoo_benchmark":  # its own command line: Hydra overrides + benchmark.*
            composed = []
            monkeypatch.setattr(app, "run", lambda cfg, _overrides: composed.append(cfg) or [])
            app.main([*overrides, "benchmark.seeds=1"])
            job = OmegaConf.to_container(composed[0])
            assert job.pop("benchmark") == {"seeds": 1}
        else:
            monkeypatch.setattr(sys, "argv", [module, "--cfg", "job", *overrides])
            app.main()
            job = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
    finally:
        GlobalHydra.instance().clear()
    assert job == expected, f"make {target}: {module} does not compose configs/"
    assert job["seed"] == 7 and job["paths"]["root"] == str(tmp_path)  # the overrides were applied


def test_checklists_name_only_existing_commands():
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", MAKEFILE, flags=re.M))
    for checklist in PROJECT_ROOT.glob("*/CHECKLIST.md"):
        for target in re.findall(r"`make ([a-z][a-z0-9-]*)", checklist.read_text()):
            assert target in targets, f"{checklist.parent.name}/CHECKLIST.md names `make {target}`"


@pytest.mark.parametrize("experiment", experiments())
def test_config_tree_composes(experiment):
    cfg = compose(f"experiment={experiment}")
    OmegaConf.resolve(cfg)
    # the name the outputs record, however the stage was started (tracking.experiment_name)
    assert cfg.experiment_name == experiment, (
        f"configs/experiment/{experiment}.yaml must set `experiment_name: {experiment}`"
    )
    for stage in ("planning", "data", "training", "debugging", "deployment", "metric_review"):
        assert cfg.paths[stage].endswith(stage), stage
