"""Experiment tracking: a thin wrapper so stage code calls `run.log(...)` whatever is switched on.

- `logger=wandb` (configs/logger/wandb.yaml): `logger.mode` is handed to wandb.init and decides
  (offline into `logs/wandb/` by default, `wandb sync logs/wandb/...` uploads later; `online` syncs live
  with a key; `disabled`). WANDB_MODE in the environment only fills in the default (see that file).
  `logger=none` turns it off; nothing else changes.
- `dvclive.dir` (configs/config.yaml, DVC projects): the jobs in `dvclive.jobs` also write every scalar
  as a TSV curve that `dvc plots show` / `dvc plots diff` draw, with no account.

`experiment_name(cfg)` is the experiment a stage records (wandb run names, export metadata, doctor reports).
"""

import math
import numbers
import os
from pathlib import Path

from omegaconf import OmegaConf


def experiment_name(cfg):
    """The experiment `cfg` was composed for: its `experiment_name` key, which configs/config.yaml sets to
    `default` and each configs/experiment/<name>.yaml to <name> (tests/test_project.py checks that they
    agree). DVC's composition keeps nothing else of `-S experiment=<name>` in params.yaml, so every stage reads
    this key, never Hydra's choice of experiment."""
    return str(cfg.get("experiment_name") or "default")


class Run:
    """No-op tracker used when logging is off; the trackers below have the same methods."""

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
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(logger.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger.project,
            dir=logger.dir,
            mode=logger.mode,
            job_type=job_type,
            name=f"{experiment_name(cfg)}-{job_type}",
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


class LiveRun(Run):
    """Scalars as dvclive TSV curves (`<dir>/plots/metrics/<key>.tsv`, x = step) plus `<dir>/metrics.json`."""

    def __init__(self, directory, resume=False):
        from dvclive import Live

        check_git_has_a_commit()
        # dvcyaml=None: dvc.yaml declares these plots itself; save_dvc_exp=False: `dvc exp run` records runs
        self.live = Live(str(directory), resume=resume, dvcyaml=None, save_dvc_exp=False)

    def log(self, data, step=None):
        if step is not None:
            self.live.step = int(step)
        for key, value in data.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                self.live.log_metric(key, float(value))

    def finish(self):
        self.live.end()


def check_git_has_a_commit():
    """dvclive (3.49) dies with `SCMError: Empty git repo` inside a git repository without commits (after a
    bare `git init`), and only after it has run `dvc init` there: say so before it starts."""
    from scmrepo.exceptions import SCMError
    from scmrepo.git import Git

    try:
        git = Git(search_parent_directories=True)
    except SCMError:
        return  # no git repository: dvclive logs without one
    try:
        if git.no_commits:
            raise RuntimeError(
                f"{git.root_dir}: a git repository without commits, where dvclive (the training curves, "
                "`dvclive.dir`) cannot log: commit once (`make repo` does) or set dvclive.dir=null"
            )
    finally:
        git.close()


class Runs(Run):
    """Every call goes to each tracker that is on."""

    def __init__(self, runs):
        self.runs = runs

    def log(self, data, step=None):
        for run in self.runs:
            run.log(data, step=step)

    def log_image(self, key, image, caption=None):
        for run in self.runs:
            run.log_image(key, image, caption)

    def log_table(self, key, rows, columns):
        for run in self.runs:
            run.log_table(key, rows, columns)

    def finish(self):
        for run in self.runs:
            run.finish()


def start_run(cfg, job_type):
    """Start tracking for one stage command (`job_type` is the stage name)."""
    runs = []
    if cfg.get("logger") is not None and cfg.logger.get("name", "none") == "wandb":
        runs.append(WandbRun(cfg, job_type))
    live = cfg.get("dvclive")
    if live is not None and live.get("dir") and job_type in live.get("jobs", []):
        resume = bool(OmegaConf.select(cfg, "training.resume", default=False))
        runs.append(LiveRun(live.dir, resume=resume))
    return runs[0] if len(runs) == 1 else Runs(runs)
