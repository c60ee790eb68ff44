"""Slow: DVC-native experiments and Hydra sweeps in a freshly baked project, run the way a user runs them.

One bake is shared: two `dvc exp run -S ...` experiments on the smoke config (their dataset is then reused
by the sweep), `dvc plots show`/`diff` on their training curves, the export stage of a third (what it records
of the experiment), and a two-job Hydra multirun through
hydra-submitit's local launcher (the code path of the SLURM launcher config).
"""

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import TEMPLATE, run
from cookiecutter.main import cookiecutter

pytestmark = pytest.mark.slow

RATES = {"lr-high": "1e-3", "lr-low": "3e-4"}


def checkpoint_lr(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint["config"]["training"]["lr"]


def ok(result):
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    project = Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(out)))
    # The DVC settings the project relies on (Hydra composition); `make setup` / `make pipeline` run it too.
    ok(run(["make", "repo", "PYTHON=python"], cwd=project))
    return project


@pytest.fixture(scope="module")
def experiments(project):
    """Two experiments that differ only in an -S override; returns {name: lr of the trained checkpoint}."""
    trained = {}
    for name, lr in RATES.items():
        ok(
            run(
                ["python", "-m", "dvc", "exp", "run", "train", "-n", name]
                + ["-S", "experiment=smoke", "-S", f"training.lr={lr}"],
                cwd=project,
            )
        )
        trained[name] = checkpoint_lr(project / "3_training/checkpoints/last.pt")
    return trained


def test_exp_run_overrides_reach_the_training_stage(experiments):
    """dvc #10186: a stage that composed configs/ itself would train every experiment with the default lr."""
    assert experiments == {name: float(lr) for name, lr in RATES.items()}


def test_exp_show_lists_both_experiments_with_parameters_and_metrics(project, experiments):
    shown = json.loads(ok(run(["python", "-m", "dvc", "exp", "show", "--json"], cwd=project)).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            found[exp["name"]] = rev["data"]
    assert set(RATES) <= found.keys(), f"experiments listed: {sorted(found)}"
    for name, lr in RATES.items():
        data = found[name]
        params = data["params"]["params.yaml"]["data"]
        assert params["experiment_name"] == "smoke"  # what the stages record of `-S experiment=smoke`
        assert params["training"]["lr"] == float(lr)
        assert params["training"]["epochs"] == 1, "the smoke experiment was not composed in"
        assert params["model"]["width"] == 8
        curves = data["metrics"]["3_training/dvclive/metrics.json"]["data"]
        assert {"loss", "re_deg_median", "te_cm_median"} <= curves["val"].keys()
    diff = ok(run(["python", "-m", "dvc", "params", "diff", *RATES, "--json"], cwd=project))
    changed = json.loads(diff.stdout)["params.yaml"]
    lr = changed["training.lr"]
    assert (lr["old"], lr["new"]) == (float(RATES["lr-high"]), float(RATES["lr-low"]))


def test_plots_show_and_diff_draw_the_training_curves(project, experiments, tmp_path):
    ok(run(["python", "-m", "dvc", "plots", "show", "-o", str(tmp_path / "show")], cwd=project))
    html = (tmp_path / "show/index.html").read_text()
    curves = project / "3_training/dvclive/plots/metrics"
    for curve in ["train/loss.tsv", "train/loss_epoch.tsv", "val/loss.tsv", "val/re_deg_median.tsv"]:
        last_step, last_value = (curves / curve).read_text().splitlines()[-1].split("\t")
        assert curve in html, f"no plot of {curve}"
        assert f'"{last_value}"' in html, f"the {curve} data is not in the page"
    ok(run(["python", "-m", "dvc", "plots", "diff", *RATES, "-o", str(tmp_path / "diff")], cwd=project))
    html = (tmp_path / "diff/index.html").read_text()
    assert all(f'"rev": "{name}"' in html for name in RATES), "the diff lacks one experiment's curves"


def test_exp_run_stages_record_the_experiment_they_ran(project, experiments):
    """Under `dvc exp run` the stages read params.yaml, which has no defaults list: the export metadata must
    name the -S experiment (it said "default" when the stages asked Hydra for its choice of experiment)."""
    fast = ["deployment.parity.n_images=2", "deployment.latency.warmup=1", "deployment.latency.runs=3"]
    ok(
        run(
            ["python", "-m", "dvc", "exp", "run", "export", "-n", "exported", "-S", "experiment=smoke"]
            + ["-S", f"training.lr={RATES['lr-low']}", *(arg for o in fast for arg in ("-S", o))],
            cwd=project,
        )
    )
    model = onnx.load(project / "5_deployment/model.onnx", load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}["experiment"] == "smoke"
    report = json.loads((project / "5_deployment/export.json").read_text())
    assert report["metadata"]["experiment"] == "smoke"


def test_multirun_jobs_write_their_own_folders(project, experiments):
    """`--multirun` through hydra-submitit's local launcher: each job trains into its own job folder."""
    shared = project / "3_training/checkpoints/last.pt"
    before = shared.read_bytes()
    rates = ["1e-3", "3e-3"]
    ok(
        run(
            ["python", "-m", f"{project.name.replace('-', '_')}.training", "--multirun"]
            + ["hydra/launcher=submitit_local", "experiment=smoke", "logger=none"]
            + [f"training.lr={','.join(rates)}"],
            cwd=project,
        )
    )
    (sweep,) = (project / "logs/hydra/multirun").iterdir()
    for job, lr in enumerate(rates):
        job_dir = sweep / str(job) / "3_training"
        assert checkpoint_lr(job_dir / "checkpoints/last.pt") == float(lr)
        assert (job_dir / "dvclive/plots/metrics/train/loss.tsv").is_file()
    assert shared.read_bytes() == before, "a sweep job wrote into the shared 3_training/"
