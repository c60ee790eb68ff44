"""DDP: two CPU processes under torchrun (gloo), the same command a GPU cluster runs with nccl."""

import os
import subprocess
import sys

import torch

from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT


def test_two_process_ddp_trains_and_only_rank_0_writes(tiny_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "{{ cookiecutter.package_name }}.training",
        "experiment=smoke", "logger=none", "training.batch_size=4", "training.epochs=2", "training.threads=1",
        "training.progress=false", "training.log_predictions=false", f"paths.root={tmp_path}",
        *tiny_dataset.overrides,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    # one process logs: each epoch line and the final summary appear once, not once per rank
    assert result.stdout.count("epoch 2/2") == 1, result.stdout
    assert result.stdout.count("checkpoints in") == 1, result.stdout
    ckpt_dir = tmp_path / "3_training" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]
    checkpoint = torch.load(ckpt_dir / "last.pt", weights_only=True)
    # 16 images, global batch 4 split over 2 ranks: 4 steps per epoch
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 8)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # loads without DDP
