import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from hydra.errors import ConfigCompositionException

from conftest import compose
from {{ cookiecutter.package_name }} import training
from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT

# A tiny, fast run: 16 training images in batches of 4, one thread so runs are bit-for-bit comparable.
TINY = [
    "experiment=smoke",
    "logger=none",
    "training.batch_size=4",
    "training.threads=1",
    "training.progress=false",
    "training.log_predictions=false",
]


def tiny_cfg(tiny_dataset, root, *overrides):
    return compose(*TINY, *tiny_dataset.overrides, f"paths.root={root}", *overrides)


def run_cli(*overrides, root, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"){% if cookiecutter.use_wandb == "yes" %}, "WANDB_MODE": "offline"{% endif %}}
    cmd = [sys.executable, "-m", "{{ cookiecutter.package_name }}.training", *overrides, f"paths.root={root}"]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_epoch_writes_loadable_checkpoints(tiny_dataset, tmp_path):
    cfg = tiny_cfg(tiny_dataset, tmp_path)
    metrics = training.fit(cfg)
    assert metrics["epoch"] == 1
    assert math.isfinite(metrics["val/re_deg_median"]) and math.isfinite(metrics["val/te_cm_median"])
    ckpt_dir = tmp_path / "3_training" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]
    checkpoint = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 4
    assert {"model", "optimizer", "scheduler", "scaler", "config", "rng"} <= checkpoint.keys()

    estimator, loaded_cfg = training.load_model(ckpt_dir / "last.pt")
    assert not estimator.training and loaded_cfg.loss.name == cfg.loss.name
    batch = next(iter(torch.utils.data.DataLoader(training.build_datasets(cfg)[1], batch_size=8)))
    R, t = estimator(batch["image"], batch["K"])
    eye = torch.eye(3).expand(len(R), 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(len(R)), atol=1e-5, rtol=0)
    assert t.shape == (len(R), 3) and torch.isfinite(t).all()


def test_training_reduces_the_loss(tiny_dataset, tmp_path):
    cfg = tiny_cfg(tiny_dataset, tmp_path, "training.epochs=6", "training.lr=3e-3")
    training.fit(cfg)
    history = torch.load(tmp_path / "3_training/checkpoints/last.pt", weights_only=True)["history"]
    losses = [h["train/loss_epoch"] for h in history]
    assert losses[-1] < 0.7 * losses[0], losses


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    training.fit(tiny_cfg(tiny_dataset, straight, "training.epochs=2", "model.dropout=0.2"))

    interrupted = tmp_path / "interrupted"
    cfg = tiny_cfg(tiny_dataset, interrupted, "training.epochs=2", "model.dropout=0.2")
    c = training.build(cfg)
    criterion, calls = c.criterion, []

    def preempt_at_step_6(out, batch):  # step 6 = the 2nd batch of epoch 2
        calls.extend([1] if torch.is_grad_enabled() else [])  # validation calls do not count
        if len(calls) == 6 and torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGTERM)
        return criterion(out, batch)

    c.criterion = preempt_at_step_6
    with pytest.raises(training.StopRequested):
        training.fit(cfg, c)
    checkpoint = torch.load(interrupted / "3_training/checkpoints/last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["batch"]) == (1, 6, 2)

    training.fit(
        tiny_cfg(tiny_dataset, interrupted, "training.epochs=2", "model.dropout=0.2", "training.resume=true")
    )
    assert_same_weights(
        weights(straight / "3_training/checkpoints/last.pt"),
        weights(interrupted / "3_training/checkpoints/last.pt"),
    )


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    args = [*TINY, *tiny_dataset.overrides, "training.epochs=4"]
    straight = run_cli(*args, root=tmp_path / "straight")

    killed = tmp_path / "killed"
    process = run_cli(*args, root=killed)
    last = killed / "3_training/checkpoints/last.pt"
    while not last.exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))  # somewhere in a later epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_cli(*args, "training.resume=true", root=killed)
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert straight.wait() == 0, straight.communicate()[0]
    assert_same_weights(weights(tmp_path / "straight/3_training/checkpoints/last.pt"), weights(last))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    cfg = tiny_cfg(tiny_dataset, tmp_path, "training.epochs=3")
    c = training.build(cfg)
    criterion, calls = c.criterion, []

    def nan_at_step_6(out, batch):
        calls.extend([1] if torch.is_grad_enabled() else [])  # validation calls do not count
        loss, parts = criterion(out, batch)
        return (loss * float("nan"), parts) if len(calls) == 6 and torch.is_grad_enabled() else (loss, parts)

    c.criterion = nan_at_step_6
    with pytest.raises(training.TrainingDiverged, match=r"loss is nan at epoch 2, step 6 .*last\.pt"):
        training.fit(cfg, c)
    checkpoint = torch.load(tmp_path / "3_training/checkpoints/last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_bad_optimizer_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"training.optimizer must be one of .*\(got 'nonsense'\)"):
        training.build(tiny_cfg(tiny_dataset, tmp_path, "training.optimizer=nonsense"))


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="training.nonsense"):
        compose("training.nonsense=1")


def test_command_exits_1_with_one_message(tiny_dataset, tmp_path):
    process = run_cli(*TINY, *tiny_dataset.overrides, "training.schedule=sometimes", root=tmp_path)
    out = process.communicate()[0]
    assert process.returncode == 1
    assert "training.schedule must be one of" in out and "Traceback" not in out


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_optimizers_and_schedules_build(tiny_dataset, tmp_path, optimizer, schedule):
    c = training.build(
        tiny_cfg(tiny_dataset, tmp_path, f"training.optimizer={optimizer}", f"training.schedule={schedule}")
    )
    for _ in range(len(c.train_loader) * c.cfg.training.epochs):
        c.optimizer.step()
        c.scheduler.step()
    assert all(group["lr"] >= 0 for group in c.optimizer.param_groups)


def test_in_plane_rotation_keeps_image_and_pose_consistent(tiny_dataset):
    dataset = training.bop.BopDataset(tiny_dataset.root, "train", 1)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(8)])
    # a bright dot where the object's origin projects; after the augmentation it must sit where the new pose projects it
    uv = training.geometry.project(torch.zeros(1, 3), batch["R"], batch["t"], batch["K"])[:, 0]
    images = torch.zeros_like(batch["image"])
    size = images.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    for i, (u, v) in enumerate(uv.tolist()):
        images[i, 0] = torch.exp(-((xs - u) ** 2 + (ys - v) ** 2) / 2.0)  # centred exactly at (u, v)
    torch.manual_seed(0)
    turned = training.rotate_in_plane(batch | {"image": images}, 180)
    uv_new = training.geometry.project(torch.zeros(1, 3), turned["R"], turned["t"], turned["K"])[:, 0]
    dot = turned["image"][:, 0]
    centroid = torch.stack([(dot * xs).sum((1, 2)), (dot * ys).sum((1, 2))], -1) / dot.sum((1, 2))[:, None]
    inside = ((uv_new > 3) & (uv_new < size - 4)).all(-1)
    assert inside.sum() >= 4
    torch.testing.assert_close(centroid[inside], uv_new[inside], atol=0.25, rtol=0)
    torch.testing.assert_close(torch.linalg.det(turned["R"]), torch.ones(8), atol=1e-5, rtol=0)
    assert not torch.allclose(turned["R"], batch["R"])


def test_prediction_grid_draws_axes_on_validation_images(tiny_dataset, tmp_path):
    c = training.build(tiny_cfg(tiny_dataset, tmp_path))
    grid = training.prediction_grid(c, n=4)
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    plain = torch.utils.data.default_collate([c.val_set[i] for i in range(4)])["image"]
    undrawn = torchvision.utils.make_grid(list((plain * 255).to(torch.uint8)), nrow=2, padding=2)
    assert grid.shape == undrawn.shape  # 2 x 2 tiles
    changed = (grid != undrawn).any(0)
    assert 0 < changed.float().mean() < 0.5  # axes drawn over the images, the images still there
