"""The symptom scan that ends `make train` (debugging/symptom_scan.py) on written histories: each symptom is
flagged with its numbers when the history shows it, stays quiet when it does not, and says "unknown" when a
history cannot tell. With the example, real `make train` runs are tested as well."""

import json
import math
from types import SimpleNamespace

import numpy as np

from {{ cookiecutter.package_name }}.debugging import stats, symptom_scan

BIG_VAL = 1000  # enough validation samples that the small-test check stays quiet


def history(step_losses, val=None):
    """A fit() history from per-epoch step losses, as training.epoch_training_metrics stores it."""
    out = []
    for i, losses in enumerate(step_losses):
        mean, var, n = stats.epoch_summary(np.arcsinh(losses))
        out.append(
            {
                "epoch": i + 1,
                "train/loss_epoch": float(np.mean(losses)),
                "train/asinh_loss_epoch": mean,
                "train/asinh_loss_epoch_var": var,
                "train/loss_epoch_steps": n,
                "val/loss": float(np.mean(losses)) if val is None else val[i],
            }
        )
    return out


def falling(epochs=12, steps=32, seed=0):
    rng = np.random.default_rng(seed)
    return [list(5.0 * 0.85**e + 0.1 * rng.standard_normal(steps)) for e in range(epochs)]


def test_a_falling_run_shows_no_symptom_and_echoes_nothing(tmp_path):
    lines = []
    symptoms = symptom_scan.report(
        history(falling()),
        tmp_path / "symptoms.json",
        n_val=BIG_VAL,
        command="make doctor",
        echo=lines.append,
    )
    assert lines == []
    assert {k: v["present"] for k, v in symptoms.items()} == {
        "no_learning": False,
        "loss_bounces": False,
        "forgetting": None,  # never measurable from a history
        "suspiciously_good": False,
        "plateau": False,
    }
    written = json.loads((tmp_path / "symptoms.json").read_text())
    assert written["doctor"] == "make doctor" and written["symptoms"]["plateau"]["still_falling"] is True


def test_an_epoch_above_the_best_earlier_one_is_a_bounce_with_its_numbers(tmp_path):
    steps = falling()
    steps[5] = list(np.asarray(steps[5]) + 3.0)  # epoch 6 jumps back above epoch 5's loss
    lines = []
    symptoms = symptom_scan.report(
        history(steps),
        tmp_path / "symptoms.json",
        n_val=BIG_VAL,
        command=symptom_scan.doctor_command("my_experiment", ["training.lr=3"]),
        echo=lines.append,
    )
    b = symptoms["loss_bounces"]
    assert b["present"] and b["epoch"] == 6 and b["best_epoch"] == 5 and b["max_rise_z"] > b["z_critical"]
    assert len(lines) == 1 and lines[0].startswith("symptom: loss bounces: epoch 6")
    assert 'make doctor EXPERIMENT=my_experiment OVERRIDES="training.lr=3"' in lines[0]


def test_one_exploding_step_is_a_bounce_that_plain_means_would_hide():
    """asinh of the step losses: one step of 1e6 among ordinary ones still makes its epoch a rise."""
    steps = falling()
    steps[6][3] = 1e6
    steps[6] = list(np.asarray(steps[6]) + 3.0)
    assert symptom_scan.scan(history(steps), BIG_VAL)["loss_bounces"]["present"]
    plain = [stats.epoch_summary(s) for s in steps]
    assert stats.epoch_rises(plain)["rises"] == 0  # what the plain means would have said


def test_a_run_whose_loss_never_falls_is_no_learning():
    rng = np.random.default_rng(1)
    steps = [list(3.0 + 0.3 * rng.standard_normal(32)) for _ in range(12)]
    s = symptom_scan.scan(history(steps), BIG_VAL)
    assert s["no_learning"]["present"] and abs(s["no_learning"]["welch_z"]) < 2.33
    assert s["plateau"]["present"]  # and the validation loss is flat too


def test_a_plateau_needs_a_flat_second_half_and_enough_epochs():
    steps = falling(epochs=12)
    val = [10.0] + [9.0 - 0.001 * (i % 2) for i in range(11)]  # 10 % below epoch 1, then flat
    s = symptom_scan.scan(history(steps, val), BIG_VAL)["plateau"]
    assert s["present"] and math.isclose(s["gain_after_first_epoch"], 1 - 8.999 / 10.0)
    still = [10.0] + [9.0 - 0.01 * i for i in range(11)]  # still falling: young, not a plateau
    assert symptom_scan.scan(history(steps, still), BIG_VAL)["plateau"]["present"] is False
    short = symptom_scan.scan(history(steps[:6], val[:6]), BIG_VAL)["plateau"]
    assert short["present"] is None and "9+ epochs" in short["unknown_because"]
    # a loss that can be negative (a log-likelihood): no relative gain
    negative = symptom_scan.scan(history(steps, [-v for v in val]), BIG_VAL)["plateau"]
    assert negative["present"] is None and "positive" in negative["unknown_because"]


def test_a_small_validation_set_is_flagged_with_its_size():
    s = symptom_scan.scan(history(falling()), n_val=32)["suspiciously_good"]
    assert s["present"] and s["n_val"] == 32 and s["min_test_size"] == 385


def test_an_old_history_without_step_summaries_is_unknown_not_healthy():
    old = [{"train/loss_epoch": 1.0, "val/loss": 1.0} for _ in range(3)]
    s = symptom_scan.scan(old, BIG_VAL)
    assert s["loss_bounces"]["present"] is None and s["no_learning"]["present"] is None


def test_the_scan_and_the_doctor_count_the_same_rises():
    """One implementation: stats.bounce_statistics (the doctor) counts exactly what stats.epoch_rises does on the
    epochs' summaries."""
    steps = falling()
    steps[4] = list(np.asarray(steps[4]) + 2.0)
    steps[8] = list(np.asarray(steps[8]) + 1.0)
    run = SimpleNamespace(epoch_step_losses=steps, val_losses_per_epoch=[], val_curve=[], diverged=False)
    doctor = stats.bounce_statistics(run)
    scan = stats.epoch_rises([stats.epoch_summary(s) for s in steps])
    assert doctor["train_rises"] == scan["rises"] == 2
    assert doctor["max_rise_z"] == scan["max_rise_z"]


def test_make_train_stores_what_the_scan_tests_and_each_loss_terms_mean():
    """training.epoch_training_metrics: the asinh summary of the epoch's step losses (the one `history` above
    builds) and the mean of every loss term except the total."""
    from {{ cookiecutter.package_name }} import training

    losses = [1.0, 1e6, 2.0, 3.0]
    state = {"losses": losses, "terms": {"a": 4.0, "b": 8.0}}
    m = training.epoch_training_metrics(state)
    mean, var, n = stats.epoch_summary(np.arcsinh(losses))
    assert m["train/asinh_loss_epoch"] == mean and m["train/asinh_loss_epoch_var"] == var
    assert m["train/loss_epoch_steps"] == n == 4
    assert m["train/a_epoch"] == 1.0 and m["train/b_epoch"] == 2.0
    one_step = training.epoch_training_metrics({"losses": [5.0], "terms": {}})
    assert one_step["train/asinh_loss_epoch_var"] == 0.0
