"""The causes the doctor decides by a measurement rather than by a fix that helps.

- `integrity(lab, screen)`: the screen's checks that invalidate every comparison of training runs: the model
  mixes the batch, ignores its input, has parameters the loss never reaches or, once trained, outputs no
  parameter can move (`implementation_bug`), the answer is in the input
  (`answer_in_input`), the validation set is too small to measure anything (`test_set_too_small`).
- `output_bottleneck(lab, screen)`: a model that does not learn or plateaus whose outputs span fewer
  dimensions than it has output components (`architecture`: a layer narrower than the output).
- `residual(lab, screen, ctx, findings)`: for a model that learns nothing and no fix from the table that
  helped: Karpathy's overfit test (`implementation_bug` when it fails, `architecture` when only a wider
  network passes it; `implementation_bug` too when some part of the output stays near the level of a
  constant prediction on the memorized samples), then `unsolvable`, but only when the model beats neither of
  two shuffled-target controls, the configured setup, trained on a grown budget (twice the steps, four
  times the samples), still does not beat the chance level (a budget too small to show learning is not
  evidence against the task), and that model fits its own training items no worse than unseen ones (else
  the training pipeline's labels disagree with validation's: `implementation_bug`).
"""

import math

import numpy as np

from . import fixes, leaks, probes, runs, stats
from .engine import NO_LEARNING, finding
from .screen import forgetting_present, gain_vs_chance, stuck_terms


def integrity(lab, screen):
    th, c, fault_fix = lab.th, screen.checks, lab.adapter.fault_fix
    found = {}
    dep = c["batch_dependency_eval"]
    mixing = dep["ratio"] > th.batch_dependency_ratio
    ignores = dep["own_gradient"] == 0.0 and c.get("batch_dependency_he_init", dep)["own_gradient"] == 0.0
    if mixing or ignores:
        what = (
            "the output of sample 0 has a gradient w.r.t. other samples' inputs in eval mode "
            f"(ratio {dep['ratio']:.3g}): the model mixes the batch (a reshape/view bug?)"
            if mixing
            else "the output has zero gradient w.r.t. the input, also after He-normal re-initialization: "
            "the model ignores its input"
        )
        found["implementation_bug"] = finding(
            "implementation_bug", True, 1.0, {"batch_dependency_eval": dep}, fault_fix(),
            f"Backprop-dependency check failed: {what}.",
        )  # fmt: skip
    unreached = c["init"].get("without_gradient", [])
    if unreached and "implementation_bug" not in found:
        n = c["init"]["n_trainable"]
        found["implementation_bug"] = finding(
            "implementation_bug", True, len(unreached) / n, {"without_gradient": unreached, "n_trainable": n},
            fault_fix("make every output the loss should train reach it (a detached or missing loss term?)"),
            f"The loss does not reach {len(unreached)} of {n} trainable parameter tensors "
            f"({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''}): no gradient flows to them, "
            "so the part of the output they compute never trains, whatever the rest of the loss does.",
        )  # fmt: skip
    dead = c.get("dead_outputs", {}).get("dead", [])
    if dead and "implementation_bug" not in found:
        n, k = c["dead_outputs"]["n_components"], c["dead_outputs"]["n_samples"]
        found["implementation_bug"] = finding(
            "implementation_bug", True, len(dead) / n, {"dead_outputs": c["dead_outputs"]},
            fault_fix("look at what the model does after its output layer (an activation, clamp or rounding?)"),
            f"After the short training run, {len(dead)} of {n} output components ({', '.join(dead[:4])}"
            f"{', ...' if len(dead) > 4 else ''}) cannot be moved by any trainable parameter on {k} training "
            "samples: their gradient w.r.t. every parameter is exactly zero, so they have stopped training. An "
            "output layer always passes gradient to its bias; something flat after it (a ReLU or clamp whose "
            "input left its range, a round, a detach) cuts it off.",
        )  # fmt: skip
    aug = c.get("augmentation_labels")
    if aug and "implementation_bug" not in found:
        low = sum(r < th.augmentation_label_correlation for r in aug["correlations"]) / aug["n_samples"]
        if low > th.augmentation_disagreeing_share:
            found["implementation_bug"] = finding(
                "implementation_bug", True, low, {"augmentation_labels": aug},
                fault_fix("make the augmentation change each label as it changes the image"),
                f"The training augmentation changes the labels in a way that disagrees with what it does to the "
                f"images: the labels drawn as images (Task.draw_labels), put through the augmentation, match a "
                f"drawing of the labels it returns with correlation {aug['correlation_median']:.2f} (median; "
                f"{low:.0%} of {aug['n_samples']} samples below {th.augmentation_label_correlation}). A right "
                "label update leaves only the warp's interpolation; look at its sign, its axis order and "
                "whether every label it should change is changed.",
            )  # fmt: skip
    sc, dup = c["shortcut"], c["duplicates"]
    frac = leaks.duplicate_fraction(dup)
    shortcut = leaks.shortcut_found(sc, th)
    if shortcut or frac >= th.duplicate_fraction:
        why = []
        if shortcut == "single value":
            why.append(
                f"one input value (flat index {sc['best_single_value_index']}) predicts target component "
                f"{sc['best_single_value_target']} with R^2 = {sc['best_single_value_r2']:.3f} above chance on the training data"
            )
        elif shortcut:
            after = sc.get("trivial_model_r2_per_image_standardized")
            where = ""
            if after is not None:
                carrier = "their coarse layout"
                if leaks.carried_by_image_statistics(sc, th):
                    carrier = "the images' global brightness, contrast or colour balance"
                where = f"; with every image standardized on its own R^2 = {after:.2f}: the answer is carried by {carrier}"
            why.append(
                f"a linear model on the {sc['trivial_model']} predicts target component "
                f"{sc['trivial_model_target']} with R^2 = {sc['trivial_model_r2']:.3f} above chance on the training data "
                f"(leave-one-out){where}"
            )
        if frac >= th.duplicate_fraction:
            why.append(f"{frac:.0%} of the validation inputs are exact copies of training inputs")
        found["answer_in_input"] = finding(
            "answer_in_input", True, max(sc["best_single_value_r2"], sc["trivial_model_r2"], frac),
            {"shortcut": sc, "duplicates": dup},
            fault_fix(), "Shortcut found: " + "; ".join(why) + ".",
        )  # fmt: skip
    ts = c["test_set"]
    if ts["n_test"] < th.min_test_size:
        found["test_set_too_small"] = finding(
            "test_set_too_small", True, 1 - ts["n_test"] / th.min_test_size, {"test_set": ts}, fault_fix(),
            f"The validation set has {ts['n_test']} samples: the 95% CI of the mean loss is "
            f"+-{ts['relative_half_width']:.0%} (bootstrap), and a success rate would be known only to "
            f"+-{1.96 * math.sqrt(0.25 / max(1, ts['n_test'])):.0%}; {th.min_test_size} samples give +-5 points.",
        )  # fmt: skip
    return found


def output_bottleneck(lab, screen):
    """`architecture` measured directly, for a model that does not learn or plateaus: its output components
    span fewer dimensions than they have (`probes.output_span` on the trained screen run), and did at
    initialization too. Linear outputs of a k-unit layer span at most k dimensions, so a layer narrower than
    the output caps the fit however long it trains, and a wider run on the doctor's short budget may not show
    it. A span that only training narrowed is units that died (ReLUs pushed below zero on every sample by a
    noisy batch or a high LR): the network is wide enough, its training is not right. Returns {cause: finding}."""
    span, init = screen.checks.get("output_span"), screen.checks.get("output_span_at_init")
    if not span or not init or not screen.present(*NO_LEARNING):
        return {}
    k, n = span["span"], span["varying"]
    if not (k < n < span["n_samples"]) or init["span"] >= init["varying"]:
        return {}  # full, or narrowed in training only: hidden units that died (a noisy batch, a high LR)
    model = lab.cfg.get("model") or {}
    fix = (
        f"model.hidden={max(4 * model['hidden'], n)}"
        if model.get("hidden")
        else f"widen the layers before the output to at least {n} units"
    )
    return {
        "architecture": finding(
            "architecture", True, 1.0 - k / n, {"output_span": span, "output_span_at_init": init}, fix,
            f"The model's {n} output components span only {k} dimension{'s' if k != 1 else ''} on {span['n_samples']} training samples "
            f"(the next singular value is {span['relative_singular_values'][k]:.1e} of the largest): some layer "
            f"between the input and the output has at most {k} active unit{'s' if k != 1 else ''}, and before "
            f"training the same network's outputs spanned {init['span']}: a layer narrower than the output, a "
            f"bottleneck no training can widen; the outputs cannot follow targets that vary in {n} directions.",
            "curves.png",
        )
    }  # fmt: skip


def overfit_test(lab, task=None):
    """Karpathy's overfit test on the doctor's budget (of `task`, default the configured setup); at the LR
    range test's suggestion when the configured LR is above its valley (a too-high LR must not pass for a
    code bug)."""
    t, d = task or lab.task, lab.d
    found = lab.lr_range_test()
    lr = min(t.lr, found["suggestion"]) if t.lr > found["lr_valley"] else t.lr
    over = probes.overfit_subset(
        t, n=d.overfit_samples, steps=d.overfit_steps, lr=lr, required_drop=lab.th.overfit_drop
    )
    curve = over.pop("curve")
    if task is None:
        lab.overfit_curve = curve
    return over | {"lr": lr}


def overfit_parts(lab, over):
    """Each named part of the output on the overfit test's samples, against the input-independent control
    overfit the same way on them (inputs zeroed, so the best it can do is one constant per part). A model that
    memorizes its samples takes every part far below that level, whichever part dominates the loss; a part
    that stays near it (ratio above `overfit_part_ratio`) is a loss term that does not compare each prediction
    with its own target, or an output the network cannot move. Returns {part: numbers}, the parts not
    memorized."""
    t, d = lab.task, lab.d
    items = runs.zero_inputs(t.train_items[: d.overfit_samples], t.input_key)
    control = probes.overfit_subset(t, n=d.overfit_samples, steps=d.overfit_steps, lr=over["lr"], items=items)
    parts = {}
    for name, value in over["final_parts"].items():
        level = control["final_parts"].get(name)
        if level is not None and level > 0 and math.isfinite(value):
            parts[name] = {"model": value, "control": level, "ratio": value / level}
    stuck = sorted(k for k, v in parts.items() if v["ratio"] > lab.th.overfit_part_ratio)
    return parts, stuck


def capacity(lab, ctx, over):
    """A failed overfit test says "code bug" only if capacity is not the reason: the same test on the fix
    table's wider network (when the model has a width). Returns the `architecture` finding when the wider
    network passes, else None; and the wider test's numbers (or None)."""
    row = next(r for r in fixes.TABLE if r.cause == "architecture")
    if not row.applies(ctx):
        return None, None
    v = row.variant(ctx)
    wide = overfit_test(lab, v.task)
    if not wide["passed"]:
        return None, wide
    return finding(
        "architecture", True, wide["drop"], {"overfit": over, "overfit_wider": wide, "model": dict(v.info["changes"])},
        row.fix(ctx, v),
        f"Cannot overfit {over['n']} samples (the loss fell by {over['drop']:.0%} in {over['steps']} steps, pass: "
        f">= {over['required_drop']:.0%}), but the fix table's wider network can ({wide['drop']:.0%}): too little "
        "capacity to fit even a handful of samples, not a code bug.",
        "overfit.png",
    ), wide  # fmt: skip


def residual(lab, screen, ctx, findings):
    """`implementation_bug` (failed overfit test; `architecture` when a wider network passes it; a grown-budget
    model that fits its training items worse than unseen ones) or `unsolvable` for a model that learns nothing
    that no fix explains (never when part of the output beats both controls);
    returns ({cause: finding}, checks)."""
    if not screen.present("no_learning") or any(f["present"] for f in findings.values()):
        return {}, {}
    over = overfit_test(lab)
    checks = {"overfit": over}
    if not over["passed"]:
        architecture, wide = capacity(lab, ctx, over)
        if wide is not None:
            checks["overfit_wider"] = wide
        if architecture:
            return {"architecture": architecture}, checks
        return {
            "implementation_bug": finding(
                "implementation_bug",
                True,
                over["drop"],
                {"overfit": over},
                lab.adapter.fault_fix(),
                f"Cannot overfit {over['n']} samples: the loss fell by {over['drop']:.0%} in {over['steps']} "
                f"steps (pass: >= {over['required_drop']:.0%}). A working model memorizes a handful of samples.",
                "overfit.png",
            )  # fmt: skip
        }, checks
    parts, stuck = overfit_parts(lab, over)
    checks["overfit_parts"] = parts
    if stuck:
        worst = max(stuck, key=lambda k: parts[k]["ratio"])
        return {
            "implementation_bug": finding(
                "implementation_bug", True, parts[worst]["ratio"], {"overfit": over, "overfit_parts": parts, "not_memorized": stuck},
                lab.adapter.fault_fix("read the loss terms behind " + ", ".join(stuck) + " against their targets"),
                f"Part of the output cannot be overfit: on {over['n']} samples the loss fell by {over['drop']:.0%}, "
                f"but {worst} ended at {parts[worst]['ratio']:.0%} of what a constant (input-independent) prediction "
                f"reaches on the same samples (pass: <= {lab.th.overfit_part_ratio:.0%}; not memorized: "
                f"{', '.join(stuck)}). A working model memorizes every part of a handful of samples: this part's "
                "loss term does not compare each prediction with its own target, or the network cannot move it.",
                "overfit.png",
            )
        }, checks  # fmt: skip
    # unsolvable: does the model beat the models trained on shuffled targets (two: the gain must exceed
    # what separates two such models)?
    vs_shuffled = lab.learned_vs_shuffled(screen.base)
    checks["vs_shuffled_targets"] = vs_shuffled
    if screen.checks["learning"]["learned"] and vs_shuffled["learned"]:
        return {}, checks  # only part of the output did not learn: the task as a whole is learnable
    # Either nothing beat the input-independent control, or what did (a part) does not beat the models trained
    # on shuffled targets either: the control was merely slower to fit the targets' mean than the model.
    # Before blaming the task: the configured setup on a grown budget (a budget too small to show learning is
    # no evidence against the task; a model that only memorized the doctor's few samples is not either),
    # against the converged chance level's loss: a part of a target that is a function of the input even
    # with meaningless labels (an encoding that uses the image's own camera) beats an unconverged control.
    more, grown = lab.grown_budget()
    grown_learning = lab.learned(grown, lab.chance_level())
    checks["grown_budget"] = {"epochs": more.epochs, "max_steps": more.max_steps,
                              "n_train": len(more.train_items), **grown_learning}  # fmt: skip
    if grown_learning["learned"]:
        return {}, checks  # the doctor's budget was too small to show learning: no evidence against the task
    # Targets that are no function of the input are as hard on the training items as on unseen ones; a model
    # that fits its own training items worse says the training pipeline's labels disagree with validation's
    # (a recording joined with other units or another convention), not that the task cannot be learned.
    fit, worse = training_items_fit(lab, more, grown)
    checks["training_items_fit"] = fit
    if worse:
        return {"implementation_bug": worse_on_training_items(lab, fit, worse)}, checks
    return {
        "unsolvable": finding(
            "unsolvable",
            True,
            1.0 - max(0.0, vs_shuffled.get("gain_vs_control", 0.0)),
            {
                "vs_shuffled_targets": vs_shuffled,
                "vs_input_independent": screen.checks["learning"],
                "grown_budget": checks["grown_budget"],
                "overfit": over,
                "tried": sorted(k for k in lab.runs if k != "configured"),
            },
            lab.adapter.fault_fix("check that the targets belong to their inputs (would a human solve it?)"),
            f"No variant beat the controls: the configured model is {vs_shuffled.get('gain_vs_control', 0):+.0%} "
            f"vs the closer of two models trained on shuffled targets (p = {vs_shuffled.get('p_value', 1):.3g}), "
            f"and on a grown budget ({more.epochs} epochs, {len(more.train_items)} samples) "
            f"{grown_learning['gain_vs_control']:+.0%} vs the chance level's loss; yet it "
            f"can overfit {over['n']} samples; wider nets, other inits, LRs and longer training did not help.",
            "curves.png",
        )
    }, checks


def training_items_fit(lab, task, run):
    """The model's eval-mode loss, and each named part, on (up to 2048 of) the items it trained on, as it
    trained on them, against validation items it never saw put through the same training pipeline
    (`TaskAdapter.augmented_val_items`: an augmentation makes samples harder, and a model that trained on
    fixed augmented views fits other views of its training images worse than unseen images). Training fits
    its own items at least as well as unseen ones, so a part that is significantly worse on them (ratio >=
    `train_worse_ratio`, two-sample permutation test p < `alpha`) says the training split gives the model
    inputs or labels that validation does not: images mirrored or labels of another convention in it.
    Returns ({part: numbers}, the parts fit worse)."""
    train, train_parts = lab.item_losses(task, run, task.train_items[:2048])
    val, val_parts = lab.item_losses(task, run, lab.adapter.augmented_val_items())
    pairs = {"loss": (train, val)}
    pairs |= {k: (v, val_parts[k]) for k, v in train_parts.items() if k in val_parts}
    fit = {}
    for name, (a, b) in pairs.items():
        p, ratio = stats.two_sample_test(a, b)
        fit[name] = {
            "train_items": float(np.mean(a)),
            "val_items": float(np.mean(b)),
            "ratio": ratio,
            "p_value": p,
        }
    worse = sorted(
        k for k, v in fit.items() if v["ratio"] >= lab.th.train_worse_ratio and v["p_value"] < lab.th.alpha
    )
    return fit, worse


def worse_on_training_items(lab, fit, worse):
    """The `implementation_bug` finding of `training_items_fit`."""
    w = max(worse, key=lambda k: fit[k]["ratio"])
    return finding(
        "implementation_bug", True, fit[w]["ratio"], {"training_items_fit": fit, "worse": worse},
        lab.adapter.fault_fix("draw training samples as the training loader gives them, with their labels"),
        f"The model fits the samples it trained on worse than samples it never saw: {w} is {fit[w]['ratio']:.2f}x "
        f"as high on its training items as on the validation items (p = {fit[w]['p_value']:.2g}; worse: "
        f"{', '.join(worse)}). Training fits its own samples at least as well as unseen ones: the training "
        "pipeline gives the model inputs or labels that validation does not.",
        "curves.png",
    )  # fmt: skip


HALVES = ("first_half", "second_half")


def training_halves(lab, screen, more, grown):
    """The parts of the output the screen's model does not learn (beside parts that it does), trained on each
    half of the stored training set alone (`TaskAdapter.half_train_items`: the first and the second half in
    stored order, where joined recordings, scenes or files stay together), as many samples on the same budget
    as the grown-budget run `grown` (task `more`; on the screen's budget a clean half does not learn a slow
    part either). Less data does not teach a model a part that all of it cannot, unless the rest of the data
    teaches it something else: a half whose model learns a stuck part (beats the input-independent control on
    it, and the grown run clearly, `Lab.unstuck`) on two seeds says the other half's labels of that part
    disagree with it (recordings joined with another convention: quaternion order, units, frames). Returns
    ({half: [{"seed", "n_train", "val_loss", "learns", "parts"} per run]}, (half, parts) or None)."""
    stuck = list(screen.symptoms["no_learning"].get("terms_not_learning") or [])
    if not stuck:
        return {}, None
    numbers = {}
    for k, half in enumerate(HALVES):
        items = lab.adapter.half_train_items(k, len(more.train_items))
        learns, numbers[half] = set(stuck), []
        for seed in (more.seed, more.seed + 1):
            name = f"{half}_only" + ("_seed+1" if seed != more.seed else "")
            run = lab.train(name, more.replace(train_items=items, seed=seed))
            learns &= set(lab.unstuck(grown, run, screen.control, stuck))
            numbers[half].append({"seed": seed, "n_train": len(items), "val_loss": run.val_loss,
                                  "learns": sorted(learns),
                                  "parts": {p: float(np.mean(run.val_parts[p])) for p in stuck if p in run.val_parts}})  # fmt: skip
            if not learns:
                break
        if learns:
            return numbers, (half, sorted(learns))
    return numbers, None


def disagreeing_half(lab, screen, grown, numbers, learner):
    """The `implementation_bug` finding of `training_halves`."""
    half, parts = learner
    other = HALVES[1 - HALVES.index(half)].replace("_", " ")
    base = grown.val_parts
    p = parts[0]
    level = numbers[half][0]["parts"][p]
    configured = float(np.mean(base[p])) if p in base else float("nan")
    return finding(
        "implementation_bug", True, 1.0 - level / configured if configured > 0 else 1.0,
        {"training_halves": numbers, "learns": parts, "stuck": screen.symptoms["no_learning"]["terms_not_learning"]},
        lab.adapter.fault_fix(f"compare the labels ({', '.join(parts)}) of the {other} of the training set with "
                              "the rest (the same convention, units and frame?)"),
        f"Part of the output ({', '.join(parts)}) does not learn from the whole training set, but does from its "
        f"{half.replace('_', ' ')} alone, on two seeds ({p}: {level:.4g} on validation vs {configured:.4g}, the same "
        f"number of samples and steps, the grown budget). Less data does not teach a model what all of it cannot: the {other}'s "
        f"labels of {', '.join(parts)} disagree with the rest (another recording's convention joined in?).",
        "curves.png",
    )  # fmt: skip


# Where to look when a symptom stays unexplained: the talk's causes for its row that no fix the doctor can
# try tests (labels, a loss term's code, the data pipeline).
LOOK_NEXT = {
    "no_learning": "draw a few training samples with their labels (does every augmentation that changes an "
    "image change its label too?) and read each loss term's code against its target",
    "loss_bounces": "look for outlier batches (per-batch losses, NaNs, mislabelled samples) and at what the data "
    "pipeline changes between epochs",
    "forgetting": "look at how the training data is ordered and sampled",
    "suspiciously_good": "look for the answer in the inputs and for copies between the splits",
    "plateau": "look at the worst validation samples (make error-analysis) and their labels, and whether the "
    "loss measures what the metric needs",
}


def on_grown_budget(lab, screen, grown):
    """The screen's symptoms measured again on the grown-budget run, by the screen's own statistics: symptom ->
    {"present": still there?, numbers}. A part of the output that stays stuck is measured against the screen's
    input-independent control (a low bar for a run with twice the steps); a plateau is gone when the grown run
    gets `plateau_gain` below chance level or is significantly better than the screen's run (the loss is still
    falling); a bounce persists only as a training loss that rises between epochs, or divergence (a validation
    loss that rises and recovers once also happens in healthy runs, e.g. the development part's `healthy`)."""
    th, s = lab.th, screen.symptoms
    after = {}
    if s["no_learning"]["present"]:
        learning = lab.learned(grown, screen.control)
        still = sorted(set(stuck_terms(learning, th)) & set(s["no_learning"]["terms_not_learning"]))
        after["no_learning"] = {"present": not learning["learned"] or bool(still), "terms_not_learning": still,
                                "gain_vs_control": learning["gain_vs_control"], "p_value": learning["p_value"]}  # fmt: skip
    if s["loss_bounces"]["present"]:
        b = stats.bounce_statistics(grown, th.alpha)
        after["loss_bounces"] = {"present": bool(b["diverged"] or b["train_rises"] > 0), **b}
    if s["forgetting"]["present"]:
        f = stats.forgetting_statistics(grown)
        after["forgetting"] = {"present": bool(forgetting_present(f, th)), **f}
    if s["suspiciously_good"]["present"]:
        after["suspiciously_good"] = {"present": True}  # the data checks do not depend on the budget
    if s["plateau"]["present"]:
        gain = gain_vs_chance(grown, lab.chance_level())
        falling = stats.compare_runs(screen.base, grown, th.alpha, th.min_fix_gain, parts=False)
        after["plateau"] = {"present": gain < th.plateau_gain and not falling["better"], "loss_gain_vs_chance": gain,
                            "better_than_screen": falling["gain"], "p_value": falling["p_value"]}  # fmt: skip
    return after


def _numbers(symptom, before, after):
    if symptom == "no_learning":
        parts = f" ({', '.join(after['terms_not_learning'])} stuck)" if after["terms_not_learning"] else ""
        return (f"{before['gain_vs_control']:+.0%} vs the input-independent control on the doctor's budget, "
                f"{after['gain_vs_control']:+.0%} on the grown one{parts}")  # fmt: skip
    if symptom == "plateau":
        return (f"{before['loss_gain_vs_chance']:.0%} below chance level on the doctor's budget, "
                f"{after['loss_gain_vs_chance']:.0%} on the grown one ({after['better_than_screen']:+.0%} vs the "
                f"screen's run, p = {after['p_value']:.2g})")  # fmt: skip
    if symptom == "loss_bounces":
        return (f"{after['train_rises']} significant rise(s) of the training loss between epochs on the grown "
                f"budget (max z = {after['max_rise_z']:.1f}){', diverged' if after['diverged'] else ''}")  # fmt: skip
    if symptom == "forgetting":
        return (
            f"first-quarter loss ratio {after['ratio']:.2f} on the grown budget (p = {after['p_value']:.2g})"
        )
    return "the data checks above"


def unexplained(lab, screen, findings):
    """A symptom that no cause explains is a finding of its own, `unexplained_<symptom>`, not health: the screen
    showed it, no cause is present, and it is still there on the grown budget (`lab.grown_budget`). A symptom
    that the grown budget does away with is a young run's (the doctor's budget is small): healthy runs stay
    clean by that evidence. Before either, the grown run must fit its own training items at least as well as
    the validation items (`training_items_fit`), else the training pipeline is an `implementation_bug`; and
    before a symptom is called unexplained, a part of the output that does not learn from the whole training
    set must not learn from either half of it alone (`training_halves`), else the halves' labels disagree: an
    `implementation_bug` in the data. Returns ({cause: finding}, checks)."""
    shown = [name for name, s in screen.symptoms.items() if s["present"]]
    if not shown or any(f["present"] for f in findings.values()):
        return {}, {}
    more, grown = lab.grown_budget()
    after = on_grown_budget(lab, screen, grown)
    # before calling the run young or the symptom unexplained: does the model fit its own training items?
    fit, worse = training_items_fit(lab, more, grown)
    checks = {"symptoms_on_grown_budget": after, "training_items_fit": fit}
    if worse:
        return {"implementation_bug": worse_on_training_items(lab, fit, worse)}, checks
    if any(after[name]["present"] for name in shown):
        # before calling the symptom unexplained: do the two halves of the training set agree?
        halves, learner = training_halves(lab, screen, more, grown)
        if halves:
            checks["training_halves"] = halves
        if learner:
            return {"implementation_bug": disagreeing_half(lab, screen, grown, halves, learner)}, checks
    budget = f"{more.epochs} epochs, {len(more.train_items)} samples"
    tried = sorted(findings)
    found = {}
    for name in shown:
        if not after[name]["present"]:
            continue
        cause = f"unexplained_{name}"
        row = screen.symptoms[name]["row"]
        found[cause] = finding(
            cause, True, 1.0,
            {"screen": screen.symptoms[name], "grown_budget": after[name], "causes_tried": tried},
            LOOK_NEXT[name],
            f"{row} ({_numbers(name, screen.symptoms[name], after[name])}), unexplained: the causes tried were "
            f"{', '.join(tried) or 'none applied'}, and a grown budget ({budget}) did not do away with it. What to look at next: "
            f"{LOOK_NEXT[name]}.",
            "curves.png",
        )  # fmt: skip
    return found, checks
