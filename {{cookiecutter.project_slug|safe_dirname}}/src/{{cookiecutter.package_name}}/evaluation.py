"""Stage 3: evaluate the trained model once on the test split.

    python -m <package>.evaluation                       # make evaluate
    python -m <package>.evaluation experiment=<name>     # that experiment's checkpoints and data

Loads `<training.checkpoint_dir>/best.pt` (`last.pt` when there is no best), lets the task predict its test
split (Task.evaluate) and writes, atomically, into 3_training/:

    metrics.json   the task's metrics, a flat dict of floats (what 1_planning/requirements.yaml names)
    errors.csv     one row per test sample, the columns the task chose (error analysis tags and slices it)

and whatever the task writes beside them (the pose example: predictions.csv, plots/). With `logger=wandb`
the metrics go to the run as test/<key>, plus the task's images.
"""

import csv
import sys
from pathlib import Path

import hydra

from . import tracking
from .checkpoints import checkpoint_dir, load_model, pick_device
from .files import atomic_path, write_json
from .paths import CONFIG_DIR
from .task import load_task


def checkpoint_path(cfg):
    """best.pt when training kept one, else last.pt; a clear error when neither exists."""
    directory = checkpoint_dir(cfg)
    for name in ("best.pt", "last.pt"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no checkpoint in {directory} (best.pt or last.pt): train first (make train)")


def write_errors_csv(path, rows):
    if not rows:
        raise ValueError("the task's evaluation returned no rows for errors.csv")
    columns = list(rows[0])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def evaluate(cfg, model=None, device=None):
    """Evaluate `model` (default: the trained checkpoint) on the test split; write the outputs; return metrics."""
    out_dir = Path(cfg.paths.training)
    device = device or pick_device(cfg)
    trained_cfg = None
    if model is None:
        path = checkpoint_path(cfg)
        model, trained_cfg = load_model(path, device)
        print(f"evaluating {path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, rows, images = load_task(cfg).evaluate(cfg, trained_cfg, model, device, out_dir)
    write_errors_csv(out_dir / "errors.csv", rows)
    write_json(out_dir / "metrics.json", summary)  # last: its presence means the evaluation completed

    run = tracking.start_run(cfg, "evaluation")
    try:
        run.log({f"test/{k}": v for k, v in summary.items()})
        for name, image in (images or {}).items():
            run.log_image(name, image, "the task's evaluation")
    finally:
        run.finish()
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    try:
        summary = evaluate(cfg)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(
        f"wrote {Path(cfg.paths.training) / 'metrics.json'} ({len(summary)} metrics) and errors.csv\n"
        "(3_training/CHECKLIST.md, after training: test-set metrics; next: make analyze)"
    )


if __name__ == "__main__":
    main()
