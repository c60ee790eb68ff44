"""Checkpoints and devices: what evaluation, export, the benchmarks and the doctor need from a training run
without importing the training loop.

A checkpoint (`3_training/checkpoints/last.pt`, `best.pt`) is a dict `{model, optimizer, scheduler, scaler,
config, rng, epoch, step, ...}` that loads with `torch.load(path, weights_only=True)`.
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from .task import load_task


def pick_device(cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def checkpoint_dir(cfg):
    return Path(cfg.training.checkpoint_dir)


def load_checkpoint(path, device="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train first: make train)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read ({error})") from error


def load_model(path, device="cpu"):
    """A checkpoint -> (the task's inference model in eval mode on `device`, the config it was trained with);
    for the pose example a PoseEstimator."""
    checkpoint = load_checkpoint(path, device)
    cfg = OmegaConf.create(checkpoint["config"])
    task = load_task(cfg)
    net = task.build_model(cfg)
    net.load_state_dict(checkpoint["model"])
    return task.inference_model(net, cfg).to(device).eval(), cfg
