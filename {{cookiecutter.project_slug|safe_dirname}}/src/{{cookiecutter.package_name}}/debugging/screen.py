"""The doctor's symptom screen: which rows of the talk's table does this experiment show?

A short training run of the configured setup (through the project's training step) and Karpathy's
input-independent control (the same run with every input zeroed), plus the cheap data and model checks that
run on every report (a leak hides behind normal curves). `screen(lab)` returns a `Screen`: the runs, the
checks and, per symptom, `present` and the numbers that decided it.
"""

import dataclasses

import torch

from ..batches import collate, to_device
from . import leaks, probes, runs, stats, symptom_scan

# the talk's rows: one table for the doctor and the symptom scan that ends `make train`
SYMPTOMS = symptom_scan.ROWS


@dataclasses.dataclass
class Screen:
    base: runs.Run  # the configured setup on the doctor's budget
    control: runs.Run  # the same, inputs zeroed
    chance: runs.Run | None  # the converged chance level, when the model learned (the plateau needs it)
    symptoms: dict  # symptom id -> {"present": bool, "row": the talk's row, numbers...}
    checks: dict  # measurement name -> numbers (report.json's `checks`)

    def present(self, *names):
        return any(self.symptoms[n]["present"] for n in names)


def data_checks(lab, base):
    """Cheap checks that run on every report: seconds each, and a leak hides behind normal curves."""
    a, task, d = lab.adapter, lab.task, lab.d
    checks = {
        "order": probes.order_test(task, a.train_loader, n=d.n_train),
        "duplicates": leaks.duplicates({"train": a.stored_train_items, "val": a.val_items}),
        "shortcut": leaks.shortcut_probe(task, remeasure_r2=lab.th.shortcut_candidate_r2),
    }
    if a.augmentation is not None:
        drawn = collate(a.stored_train_items[: min(64, len(a.stored_train_items))])
        agreement = probes.augmentation_agreement(a.spec.draw_labels, a.augmentation, drawn, a.spec.input_key)
        if agreement is not None:
            checks["augmentation_labels"] = agreement
    input_stats = probes.input_statistics(task)
    checks["input_statistics"] = {k: v for k, v in input_stats.items() if k not in ("mean", "std")}
    checks["test_set"] = probes.test_set_precision(base.val_losses, a.n_val_total)
    batch = to_device(collate(a.train_items[: min(16, len(a.train_items))]), a.device)
    model = task.model_factory().to(a.device)
    checks["batch_dependency_eval"] = probes.batch_dependency(model, batch)
    checks["batch_dependency_train"] = probes.batch_dependency(model, batch, train_mode=True)
    if checks["batch_dependency_eval"]["own_gradient"] == 0.0:
        # zero input gradient: disconnected in the code, or only dead weights? Ask a He-initialized copy.
        checks["batch_dependency_he_init"] = probes.batch_dependency(probes.he_initialized(model), batch)
    checks["init"] = probes.init_statistics(task.model_factory().to(a.device), batch, task.criterion)
    if base.model is not None and not base.diverged:
        many = to_device(collate(a.train_items[: min(64, len(a.train_items))]), a.device)
        checks["dead_outputs"] = probes.dead_outputs(base.model, many, forward=task.forward)
        span = probes.output_span(base.model, many, forward=task.forward, tol=lab.th.output_span_tol)
        checks["output_span"] = span
        if span["span"] < span["varying"]:
            # units die in training (a noisy batch, a high LR); a layer narrower than the output is narrow
            # before training too
            fresh = task.model_factory().to(a.device)
            checks["output_span_at_init"] = probes.output_span(
                fresh, many, forward=task.forward, tol=lab.th.output_span_tol
            )
    return checks


def stuck_terms(learning, th):
    """The named parts of the output that do not beat the control while the model as a whole does."""
    return stats.terms_not_learning(learning, th.alpha, th.min_learning_gain) if learning["learned"] else []


def forgetting_present(forgetting, th):
    ratio = forgetting["ratio"]
    return ratio is not None and ratio > th.forgetting_ratio and forgetting["p_value"] < th.alpha


def gain_vs_chance(run, chance):
    """How far `run`'s validation loss is below chance level, relative (the plateau's measure)."""
    return 1.0 - run.val_loss / chance.val_loss if chance.val_loss > 0 else 0.0


def screen(lab):
    th, task = lab.th, lab.task
    base = lab.train("configured", task)
    control = lab.train("input_independent", task, items=runs.zero_inputs)
    learning = lab.learned(base, control)
    bounce = stats.bounce_statistics(base, th.alpha)
    forgetting = stats.forgetting_statistics(base)
    # the plateau's trend: the training loss per step over the second half (the val curve has too few points)
    steps = base.step_losses
    slope, p_trend = stats.trend_test(steps[len(steps) // 2 :])
    checks = {
        "learning": learning,
        "bounce": bounce,
        "forgetting": forgetting,
        "trend_second_half": {"slope": slope, "p_value": p_trend},
        **data_checks(lab, base),
    }
    # "won't go above random" for the whole output, or for a named part of it while the rest learns
    stuck = stuck_terms(learning, th)
    no_learning = not learning["learned"] or bool(stuck)
    bounces = bounce["diverged"] or bounce["train_rises"] > 0 or bounce["val_rises_undone"] > 0
    forgets = forgetting_present(forgetting, th)
    # Plateau: it learned, but its validation loss is little below chance level, the best loss any
    # input-independent model reaches. Chance, not the control above: the control shares the configured
    # recipe, so too much regularization or a poor optimizer handicaps it as much as the model and hides
    # the plateau. Within the doctor's budget a slow crawl (poor optimizer, low LR) and a plateau look the
    # same, and so can a healthy run that is still young: only a fix that helps names a cause.
    flat = not (slope < 0 and p_trend < th.alpha)
    whole = len(base.val_curve) >= int(lab.cfg.training.epochs)
    gain, chance = None, None
    if learning["learned"]:
        chance = lab.chance_level()
        checks["chance_level"] = {"val_loss": chance.val_loss, "best_epoch": lab.chance_best_epoch}
        gain = gain_vs_chance(base, chance)
    plateau = gain is not None and gain < th.plateau_gain
    dup = leaks.duplicate_fraction(checks["duplicates"])
    small_test = checks["test_set"]["n_test"] < th.min_test_size
    good = (
        leaks.shortcut_found(checks["shortcut"], th) is not None or dup >= th.duplicate_fraction or small_test
    )
    symptoms = {
        "no_learning": {"present": no_learning, "terms_not_learning": stuck, **learning},
        "loss_bounces": {"present": bool(bounces), **bounce},
        "forgetting": {"present": bool(forgets), **forgetting},
        "suspiciously_good": {
            "present": bool(good),
            "best_single_value_r2": checks["shortcut"]["best_single_value_r2"],
            "trivial_model_r2": checks["shortcut"]["trivial_model_r2"],
            "duplicate_fraction": dup,
            "n_test": checks["test_set"]["n_test"],
            "test_ci95_relative_half_width": checks["test_set"]["relative_half_width"],
        },
        "plateau": {
            "present": bool(plateau),
            "still_falling": not flat,
            "screen_ran_whole_schedule": whole,
            "loss_gain_vs_chance": gain,
            "second_half_train_slope": slope,
            "second_half_train_trend_p": p_trend,
        },
    }
    for name, s in symptoms.items():
        s["row"] = SYMPTOMS[name]
    return Screen(base, control, chance, symptoms, checks)


def input_mean_std(task):
    """Per-channel mean and std of the training inputs (the input-feature fix standardizes with them)."""
    st = probes.input_statistics(task)
    return torch.as_tensor(st["mean"]), torch.as_tensor(st["std"])
