"""`make train` ends with a symptom scan of its own history (debugging/symptom_scan.py), checked on real runs
through the command line: the zoo's lr_too_high config prints the bounce and points to `make doctor` with its
experiment; the healthy config prints none of the training-curve symptoms.

The budget is a tiny equivalent of the real run: the zoo configs' own 22-epoch schedule, on 256 training
images of 32 px in batches of 8 (32 steps an epoch; ~17 s a run on 2 cores). With 4 steps an epoch (the
shared 16-image dataset) no epoch-level test can tell a rise from noise, so this module renders its own.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_IMAGES, capture_dataset
from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT

# two real 22-epoch runs (~40 s together on 2 cores): end-to-end, with the slow tests
pytestmark = pytest.mark.slow

CURVE_SYMPTOMS = ("loss bounces", "no learning", "plateau")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = capture_dataset(tmp_path_factory, "symptoms_dataset", 256, 32, 1, *TINY_IMAGES)
    return [f"data.root={root}", *TINY_IMAGES]


def train(dataset, root, experiment):
    """`make train EXPERIMENT=<experiment>` on the small budget; returns (stdout, symptoms.json's symptoms)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"){% if cookiecutter.use_wandb == "yes" %}, "WANDB_MODE": "offline"{% endif %}}
    cmd = [
        sys.executable,
        "-m",
        "{{ cookiecutter.package_name }}.training",
        f"experiment={experiment}",
        *dataset,
        "logger=none",
        "model.width=8",
        "model.hidden=32",
        "training.batch_size=8",
        "training.amp=false",
        "training.threads=1",
        "training.progress=false",
        "training.log_predictions=false",
        f"paths.root={root}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads((root / "3_training" / "symptoms.json").read_text())
    assert written["doctor"].startswith(f"make doctor EXPERIMENT={experiment} OVERRIDES=")
    return done.stdout, written["symptoms"]


def symptom_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("symptom: ")]


def test_lr_too_high_ends_with_the_bounce_and_the_doctor_command(dataset, tmp_path):
    stdout, symptoms = train(dataset, tmp_path, "zoo/lr_too_high")
    bounce = [line for line in symptom_lines(stdout) if line.startswith("symptom: loss bounces")]
    assert len(bounce) == 1, stdout
    assert "make doctor EXPERIMENT=zoo/lr_too_high" in bounce[0]
    b = symptoms["loss_bounces"]
    assert b["present"] and b["rises"] >= 1 and b["max_rise_z"] > b["z_critical"]
    assert f"epoch {b['epoch']}'s mean training loss" in bounce[0]


def test_a_healthy_run_prints_no_training_curve_symptom(dataset, tmp_path):
    stdout, symptoms = train(dataset, tmp_path, "zoo/healthy")
    lines = symptom_lines(stdout)
    assert not [line for line in lines if line.startswith(tuple(f"symptom: {s}" for s in CURVE_SYMPTOMS))]
    assert {k: symptoms[k]["present"] for k in ("no_learning", "loss_bounces", "plateau")} == {
        "no_learning": False,
        "loss_bounces": False,
        "plateau": False,
    }
    # 32 validation images: the one line this run can justify, with its number
    assert lines == [line for line in lines if line.startswith("symptom: suspiciously good")]
    assert symptoms["suspiciously_good"]["n_val"] == 32
    assert symptoms["forgetting"]["present"] is None  # unknown from a history, not "healthy"
    # the history the scan read keeps the per-epoch mean of every loss term beside the total
    history = torch.load(tmp_path / "3_training/checkpoints/last.pt", weights_only=True)["history"]
    assert len(history) == 22
    assert {"train/loss_epoch", "train/rot_epoch", "train/trans_epoch"} <= history[-1].keys()
    assert history[-1]["train/loss_epoch_steps"] == 32
