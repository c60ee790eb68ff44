"""The symptom scan of a real training run: `make train` ends with it (`training.fit`, rank 0). It reads the
run's own history (per epoch: the training loss's mean, variance and step count, the loss terms' means, the
validation loss and errors) and measures the doctor's symptoms with the doctor's own tests (`stats.py`), as
far as a history can tell:

- `loss_bounces`: `stats.epoch_rises`, the training-loss half of `stats.bounce_statistics`: an epoch's mean
  step loss significantly above the best earlier epoch's (Welch z, α). Validation rises that are undone
  later need per-sample validation losses, which the history does not keep.
- `no_learning`: the last epoch's training loss is not significantly below the first epoch's (`stats.welch_z`,
  α). A model that learns only the mean target (what an input-independent model can) passes this scan: only
  the doctor's input-independent control tells the two apart.
- `plateau`: after its first epoch the best validation loss fell by less than `plateau_gain`, and the second
  half of the validation curve is not falling (`stats.trend_test`, α; 9+ epochs, or the test cannot decide:
  a young run and a plateau look the same). The doctor measures the gain against chance level, which a
  history does not have.
- `suspiciously_good`: a validation set smaller than `min_test_size`. Shortcuts in the input and train/val
  duplicates need the doctor's data checks.
- `forgetting`: not measurable here (it needs the losses of the same samples right after training on them
  and at the epoch's end): always `present: null`.

Each symptom in 3_training/symptoms.json: `present` true / false / null (null: this history cannot tell, with
`unknown_because`), the numbers that decided it and the doctor's row. Thresholds are the doctor's
(configs/debugging/doctor/default.yaml `thresholds`). Generic: it knows loss values, not what they measure.
"""

import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ..files import write_json
from ..paths import group_defaults
from . import stats

ROWS = {  # the talk's rows, the doctor's symptom ids (screen.SYMPTOMS is this table)
    "no_learning": "Network won't go above random performance",
    "loss_bounces": "Loss bounces over epochs",
    "forgetting": "Catastrophic forgetting",
    "suspiciously_good": "Suspiciously good performance",
    "plateau": "Plateaus at a strangely low performance",
}
USED = ("alpha", "plateau_gain", "min_test_size")


def thresholds(cfg=None):
    """The doctor's thresholds this scan uses: the config's, or configs/debugging/doctor/default.yaml's where a
    config has no doctor section (one source of truth either way)."""
    th = OmegaConf.select(cfg, "debugging.doctor.thresholds") if cfg is not None else None
    th = th or group_defaults("debugging/doctor/default")["thresholds"]
    return {k: float(th[k]) for k in USED}


def epoch_summaries(history):
    """(mean, variance, steps) of the asinh of each epoch's training step losses, as `make train` stores them
    (`training.epoch_training_metrics`: asinh keeps one exploding step from hiding a rise in its variance)."""
    keys = ("train/asinh_loss_epoch", "train/asinh_loss_epoch_var", "train/loss_epoch_steps")
    if not all(k in h for h in history for k in keys):
        return None  # a history written before the scan existed (a resumed old checkpoint)
    return [(h[keys[0]], h[keys[1]], int(h[keys[2]])) for h in history]


def unknown(reason, **numbers):
    return {"present": None, "unknown_because": reason, **numbers}


def bounces(history, summaries, alpha):
    if summaries is None or sum(s[2] >= 2 for s in summaries) < 2:
        return unknown("needs 2 epochs of 2+ steps with the per-epoch training loss variance")
    r = stats.epoch_rises(summaries, alpha)
    if "epoch" in r:  # the plain epoch means beside the asinh ones the test used
        r["train_loss"] = history[r["epoch"] - 1]["train/loss_epoch"]
        r["best_train_loss"] = history[r["best_epoch"] - 1]["train/loss_epoch"]
    return {
        "present": r["rises"] > 0,
        **r,
        "not_checked": "validation rises that are undone later (needs per-sample validation losses)",
    }


def no_learning(history, summaries, alpha):
    usable = [(h, s) for h, s in zip(history, summaries or [], strict=False) if s[2] >= 2]
    if len(usable) < 2:
        return unknown("needs 2 epochs of 2+ steps with the per-epoch training loss variance")
    (h_first, first), (h_last, last) = usable[0], usable[-1]
    z = stats.welch_z(last, first)
    z_crit = stats.z_quantile(1 - alpha)  # one-sided: a fall needs z < -z_crit
    return {
        "present": not z < -z_crit,
        "first_epoch_train_loss": h_first["train/loss_epoch"],
        "last_epoch_train_loss": h_last["train/loss_epoch"],
        "welch_z": float(z),
        "z_critical": float(-z_crit),
        "not_checked": "learning beyond the mean target (needs the doctor's input-independent control)",
    }


def plateau(history, th):
    val = [h["val/loss"] for h in history if math.isfinite(h.get("val/loss", math.nan))]
    second = val[len(val) // 2 :]
    if math.factorial(len(second)) * th["alpha"] < 1:
        # the trend test cannot reach alpha on so few points: a young run and a plateau look the same
        return unknown(f"needs {min_epochs(th['alpha'])}+ epochs (a second half the trend test can decide)")
    if val[0] <= 0:
        return unknown("a relative gain needs a positive first validation loss")
    best = min(val[1:])
    gain = 1.0 - best / val[0]
    slope, p = stats.trend_test(second)
    still_falling = bool(slope < 0 and p < th["alpha"])
    return {
        "present": bool(gain < th["plateau_gain"] and not still_falling),
        "first_epoch_val_loss": val[0],
        "best_val_loss_after_first_epoch": best,
        "gain_after_first_epoch": float(gain),
        "plateau_gain": th["plateau_gain"],
        "still_falling": still_falling,
        "second_half_val_slope": float(slope),
        "second_half_val_trend_p": float(p),
        "not_checked": "the level vs chance (needs the doctor's converged input-independent model)",
    }


def min_epochs(alpha):
    """The fewest epochs whose second half (n // 2 points and up) a permutation trend test can find falling at
    `alpha`: the second half's n! orderings must include one as rare as alpha."""
    n = 3
    while math.factorial(len(range(n)[n // 2 :])) * alpha < 1:
        n += 1
    return n


def suspiciously_good(n_val, th):
    if n_val is None:
        return unknown("the validation set's size is not known")
    return {
        "present": bool(n_val < th["min_test_size"]),
        "n_val": int(n_val),
        "min_test_size": int(th["min_test_size"]),
        "not_checked": "shortcuts in the input, train/val duplicates (the doctor's data checks)",
    }


def scan(history, n_val=None, th=None):
    """{symptom id: {"present": True/False/None, numbers..., "row": the talk's row}} for a fit() history."""
    th = th or thresholds()
    history = list(history)
    summaries = epoch_summaries(history)
    symptoms = {
        "no_learning": no_learning(history, summaries, th["alpha"]),
        "loss_bounces": bounces(history, summaries, th["alpha"]),
        "forgetting": unknown(
            "needs the losses of the same samples right after training on them and at the epoch's end"
        ),
        "suspiciously_good": suspiciously_good(n_val, th),
        "plateau": plateau(history, th),
    }
    for name, s in symptoms.items():
        s["row"] = ROWS[name]
    return symptoms


def describe(name, s):
    """One line of numbers for a present symptom."""
    if name == "loss_bounces":
        return (
            f"loss bounces: epoch {s['epoch']}'s mean training loss {s['train_loss']:.4g} is above epoch "
            f"{s['best_epoch']}'s {s['best_train_loss']:.4g} (Welch z {s['max_rise_z']:.1f} > "
            f"{s['z_critical']:.2f} on asinh of the step losses; {s['rises']} epoch(s) rose)"
        )
    if name == "no_learning":
        return (
            f"no learning: the last epoch's mean training loss {s['last_epoch_train_loss']:.4g} is not "
            f"significantly below the first epoch's {s['first_epoch_train_loss']:.4g} (Welch z {s['welch_z']:.2f})"
        )
    if name == "plateau":
        trend = "still falling" if s["still_falling"] else "flat"
        return (
            f"plateau: after epoch 1 the validation loss fell only {100 * s['gain_after_first_epoch']:.0f} % "
            f"({s['first_epoch_val_loss']:.4g} -> best {s['best_val_loss_after_first_epoch']:.4g}; < "
            f"{100 * s['plateau_gain']:.0f} %), second half {trend} (trend p {s['second_half_val_trend_p']:.2g})"
        )
    if name == "suspiciously_good":
        return (
            f"suspiciously good (here: a validation set too small to trust, whatever its numbers): {s['n_val']} "
            f"samples, fewer than the {s['min_test_size']} a +-5 point 95 % CI on a success rate needs"
        )
    return f"{name}: {s}"


def doctor_command(experiment=None, overrides=()):
    """The `make doctor` call that diagnoses this run's config."""
    cmd = "make doctor" + (f" EXPERIMENT={experiment}" if experiment else "")
    if overrides:
        cmd += f' OVERRIDES="{" ".join(overrides)}"'
    return cmd


def hydra_command_line():
    """(experiment, other overrides) of the running Hydra command (`make train EXPERIMENT=... OVERRIDES=...`);
    (None, []) outside one (a test calling fit)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None, []
    experiment = hc.runtime.choices.get("experiment")
    others = [o for o in hc.overrides.task if not o.startswith("experiment=")]
    return (str(experiment) if experiment else None), others


def report(history, path, n_val=None, th=None, command=None, echo=print):
    """Scan `history`, write the result to `path` (atomic JSON) and echo one line per present symptom, each
    pointing to the doctor. Returns the symptoms."""
    symptoms = scan(history, n_val, th)
    command = command or doctor_command(*hydra_command_line())
    write_json(Path(path), _jsonable({"doctor": command, "symptoms": symptoms}))
    for name, s in symptoms.items():
        if s["present"]:
            echo(f"symptom: {describe(name, s)} -> diagnose with `{command}`")
    return symptoms


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
