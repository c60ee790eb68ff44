"""Experiment tracking: a thin wrapper so stage code calls `run.log(...)` whether or not wandb is on.

`logger=wandb` (configs/logger/wandb.yaml) logs offline into `logs/wandb/` by default; set
`logger.mode=online` (or WANDB_MODE=online with a key) to sync live, or `wandb sync logs/wandb/...`
later. `logger=none` turns it off; nothing else changes.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf


class Run:
    """No-op tracker used when logging is off; the wandb one below has the same methods."""

    def log(self, data, step=None):
        pass

    def log_image(self, key, image, caption=None):
        pass

    def log_table(self, key, rows, columns):
        pass

    def finish(self):
        pass


class WandbRun(Run):
    def __init__(self, cfg, job_type):
        import wandb

        self.wandb = wandb
        logger = cfg.logger
        os.environ.setdefault("WANDB_MODE", logger.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(logger.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger.project,
            dir=logger.dir,
            job_type=job_type,
            group=logger.get("group"),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log(self, data, step=None):
        self.run.log(data, step=step)

    def log_image(self, key, image, caption=None):
        self.run.log({key: self.wandb.Image(image, caption=caption)})

    def log_table(self, key, rows, columns):
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def finish(self):
        self.run.finish()


def start_run(cfg, job_type):
    """Start tracking for one stage command (`job_type` is the stage name)."""
    if cfg.get("logger") is None or cfg.logger.get("name", "none") != "wandb":
        return Run()
    return WandbRun(cfg, job_type)
