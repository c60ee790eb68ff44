"""The fix table: the causes whose diagnostic is the talk's "apply the fix and see".

Each row of `TABLE` declares, in one place, a cause of the talk's table: its symptom row, the screen symptoms
that call for trying it, when it applies to this config, the fixed variant to train (a config override or a
wrapped model), the fix to print (a Hydra override on the user's config) and the sentence with the numbers.
`engine.run` does the rest, the same for every row. Thresholds and their reasons: 4_debugging/FAILURE_MODES.md.
"""

import dataclasses

import numpy as np

from . import probes, stats
from .engine import ALWAYS, BAD, NO_LEARNING, Fix, Variant
from .lab import with_overrides
from .screen import input_mean_std


def _change(result, what="it"):
    """'lowers <what> by 23% (p = 0.0001)' for anything with a relative `gain` and a `p_value`."""
    verb = "lowers" if result["gain"] >= 0 else "raises"
    return f"{verb} {what} by {abs(result['gain']):.0%} (p = {result['p_value']:.2g})"


def _effect(effect):
    """'lowers val loss by 23% (p = 0.0001)' for a fix_effect result, with its repeat, other try and comparison
    with training longer when it has them."""
    text = _change(effect, f"val {effect['metric']}")
    if effect.get("unstuck"):
        text += f", and {', '.join(effect['unstuck'])}, which did not learn, now beat the input-independent control"
    again = effect.get("replicate")
    if again:
        text += f"; on the next seed it {_change(again)}" + (
            "" if again["helped"] else ": not repeated, seed-to-seed luck"
        )
    other = effect.get("other_try")
    if other:
        text += f"; the other try ({other['variant']}, lr {other['lr']:.2g}) {_change(other)}"
    versus = effect.get("vs_longer")
    if versus:
        text += (
            f"; compared with training longer ({versus['epochs']} epochs) the fix {_change(versus, 'val loss')}"
            + (
                ""
                if versus["better"]
                else ": no more than training longer, a run that is slow on the doctor's budget"
            )
        )
    return text


def _short(lr):
    return {k: v for k, v in lr.items() if k not in ("lrs", "losses")}


def _fmt(values):
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


# --- loss bounces: learning rate, batch size ------------------------------------------------------------------


def _lr_variant(ctx):
    return Variant("lr_suggested", ctx.task.replace(lr=ctx.lr["suggestion"]), {"lr": ctx.lr["suggestion"]})


def _lower_lr_retry(ctx, v):
    """The variant again at a third of its LR when that LR is the range test's suggestion. Smith's rule (the
    valley / 10) is read off one short, noisy curve: the same network's valley has come out at 0.037 at batch
    64 and at 0.094 and 0.12 at batch 32 on the example, and an Adam run at the suggestion from the higher
    reading can bounce where one a factor 3 lower learns. A third is the next step of a 1-3-10 grid."""
    if v.info.get("lr") != ctx.lr["suggestion"]:
        return None
    lr = v.info["lr"] / 3
    return dataclasses.replace(
        v, name=f"{v.name}_third", task=v.task.replace(lr=lr), info=v.info | {"lr": lr}
    )


def _lr_explain(ctx, v, effect):
    t, lr = ctx.task, ctx.lr
    side = "above" if t.lr > lr["lr_valley"] else "far below"
    at = "the suggestion" if v.info["lr"] == lr["suggestion"] else f"{v.info['lr']:.2g}"
    return (
        f"training.lr={t.lr:g} is {side} the LR range test's valley ({lr['lr_valley']:.2g}; suggestion "
        f"{lr['suggestion']:.2g}); training at {at} {_effect(effect)}.",
        {"lr_range": _short(lr), "lr_fix": effect, "lr": v.info["lr"]},
    )


def _batch_variant(ctx):
    # The larger batch at an LR the range test (run at a batch of at least reference_batch_size) calls safe:
    # an LR that only a tiny batch's noise kept from diverging is not what the larger batch should inherit.
    t = ctx.task
    big = min(len(t.train_items) // 2, max(t.batch_size * 8, ctx.lab.d.reference_batch_size))
    lr = min(t.lr, ctx.lr["suggestion"])
    return Variant("larger_batch", t.replace(batch_size=big, lr=lr), {"batch_size": big, "lr": lr})


def _batch_fix(ctx, v):
    lr = f" training.lr={v.info['lr']:.2g}" if v.info["lr"] < ctx.task.lr else ""
    return f"training.batch_size={v.info['batch_size']}" + lr


def _batch_explain(ctx, v, effect):
    lr = ""
    if v.info["lr"] < ctx.task.lr:
        what = (
            "the LR range test's suggestion"
            if v.info["lr"] == ctx.lr["suggestion"]
            else "a third of its suggestion"
        )
        lr = f" at lr {v.info['lr']:.2g} ({what})"
    return (
        f"At batch size {ctx.task.batch_size} the gradient is noise-dominated (noise scale B_simple = "
        f"{ctx.noise['b_simple']:.0f}, McCandlish et al. 2018); batch size {v.info['batch_size']}{lr} "
        f"{_effect(effect)}.",
        {"gradient_noise": ctx.noise, "batch_fix": effect, "lr": v.info["lr"]},
    )


def _noisy_batch(ctx):
    b = ctx.noise.get("b_simple")
    th = ctx.lab.th
    return (
        b is not None
        and ctx.task.batch_size * th.noise_batch_factor <= b
        and ctx.task.lr <= ctx.lr["lr_valley"]
    )


# --- won't go above random: architecture, initialization, input features, not started -----------------------


def _wider_variant(ctx):
    m, u = ctx.model, ctx.user.model
    changes = {"model.width": m.width * 4, "model.hidden": m.get("hidden", 64) * 4}
    fix = {"model.width": u.width * 4, "model.hidden": u.get("hidden", 64) * 4}
    if m.get("depth", 1) > 1:
        changes["model.depth"] = fix["model.depth"] = max(1, m.depth // 2)
    task = ctx.lab.adapter.task(with_overrides(ctx.cfg, changes))
    return Variant("wider", task, {"changes": changes, "fix": fix})


def _generalization_gap(ctx):
    """1 - (training loss over the last epoch) / (validation loss) of the configured run."""
    base = ctx.screen.base
    if not base.epoch_step_losses or not base.val_loss > 0:
        return 0.0
    return 1.0 - float(np.mean(base.epoch_step_losses[-1])) / base.val_loss


def _wider_confirm(ctx, v, effect, run):
    # Ng's bias/variance split: a bigger network is the fix for high bias, a training loss as high as the
    # validation loss. A network that already fits its training data clearly better than held-out data is
    # not short of capacity, even when a wider one (which any run gains a little from) helps.
    return effect["helped"] and _generalization_gap(ctx) < ctx.lab.th.generalization_gap


def _wider_explain(ctx, v, effect):
    shallower = " and shallower" if "model.depth" in v.info["changes"] else ""
    gap = _generalization_gap(ctx)
    fits = (
        f"; the configured network fits its training data {gap:.0%} better than validation data (variance, "
        "not a lack of capacity)"
        if gap >= ctx.lab.th.generalization_gap
        else ""
    )
    return (
        f"A 4x wider{shallower} network {_effect(effect)}{fits}.",
        {"wider_fix": effect, "model": dict(v.info["changes"]), "generalization_gap": gap},
    )


def _init_variant(ctx):
    new = "he_normal" if ctx.model.init != "he_normal" else "default"
    return Variant(
        "he_init", ctx.lab.adapter.task(with_overrides(ctx.cfg, {"model.init": new})), {"init": new}
    )


def _init_off(ctx):
    """The initialization is measured off: some layer's weight std is outside a factor `init_std_factor` of
    He-normal's (PyTorch's default, Xavier and LeCun init are all within a factor 3 of it)."""
    if ctx.model.get("init") is None:
        return False
    he = [r["weight_std_over_he"] for r in ctx.screen.checks["init"]["layers"]]
    f = ctx.lab.th.init_std_factor
    return bool(he) and (min(he) < 1 / f or max(he) > f)


def _init_explain(ctx, v, effect):
    init, control = ctx.screen.checks["init"], ctx.screen.control
    he = [r["weight_std_over_he"] for r in init["layers"]]
    return (
        f"model.init={ctx.model.init}: loss at init {init['loss_at_init']:.3g} vs {control.val_loss:.3g} for "
        f"the input-independent control; weight std / He-normal std ranges {min(he):.2g}..{max(he):.2g}; "
        f"{v.info['init']} init {_effect(effect)}.",
        {
            "init_fix": effect,
            "loss_at_init": init["loss_at_init"],
            "control_val_loss": control.val_loss,
            "weight_std_over_he_min": min(he),
            "weight_std_over_he_max": max(he),
            "layers": init["layers"],
        },
    )


def _inputs_off(ctx):
    st, th = ctx.screen.checks["input_statistics"], ctx.lab.th
    spread = 1 / th.input_std_factor <= st["min_std"] and st["max_std"] <= th.input_std_factor
    return st["max_abs_mean"] > th.input_mean_max or not spread


def _standardized_variant(ctx):
    cfg = ctx.cfg
    variant = with_overrides(cfg, {"model.normalize_input": False}) if "normalize_input" in ctx.model else cfg
    base_task = ctx.lab.adapter.task(variant)
    mean, std = input_mean_std(ctx.task)

    def factory(base_factory=base_task.model_factory):
        return probes.Standardize(base_factory(), mean, std)

    return Variant("standardized_input", base_task.replace(model_factory=factory))


def _standardized_explain(ctx, v, effect):
    st = ctx.screen.checks["input_statistics"]
    return (
        f"Inputs have channel means {_fmt(st['channel_mean'])} and stds {_fmt(st['channel_std'])}, far from the "
        f"mean 0 and std 1 a network's initialization assumes; on the doctor's budget standardizing them "
        f"{_effect(effect)} (a normalization layer can absorb a scale on a short run).",
        {"input_statistics": st, "standardize_fix": effect},
    )


def _longer_variant(ctx):
    task, run = ctx.lab.longer()
    return Variant("longer", task, {"epochs": task.epochs}, trained=run)


def _longer_learns(ctx, run):
    return ctx.lab.learned(run, ctx.ref.chance or ctx.screen.control)["learned"]


def _longer_confirm(ctx, v, effect, run):
    # Training longer helps any run the doctor cut short. It implicates the configured schedule only when
    # the screen ran all of it; otherwise the short schedule was the doctor's own budget.
    whole = ctx.screen.symptoms["plateau"]["screen_ran_whole_schedule"]
    return whole and effect["helped"] and _longer_learns(ctx, run)


def _longer_explain(ctx, v, effect):
    t, base = ctx.task, ctx.screen.base
    slope, p_trend = stats.trend_test(base.val_curve)
    whole = ctx.screen.symptoms["plateau"]["screen_ran_whole_schedule"]
    learns = _longer_learns(ctx, ctx.lab.runs[v.name])
    tail = (
        "."
        if whole
        else f" (the screen ran {len(base.val_curve)} of the configured {ctx.user.training.epochs} "
        "epochs, so this does not implicate the schedule)."
    )
    return (
        f"Over the configured {t.epochs} epoch(s) the val loss trend is {slope:+.3g}/epoch (p = {p_trend:.3g}); "
        f"{v.info['epochs']} epochs: {_effect(effect)}, and {'do' if learns else 'do not'} beat the "
        "input-independent control" + tail,
        {
            "trend": {"slope_per_epoch": slope, "p_value": p_trend},
            "longer_fix": effect,
            "longer_learns": learns,
            "epochs": [t.epochs, v.info["epochs"]],
            "screen_ran_whole_schedule": whole,
        },
    )


def _frozen(ctx):
    return ctx.screen.checks["init"].get("frozen", [])


def _unfrozen_variant(ctx):
    base = ctx.task

    def factory(base_factory=base.model_factory):
        model = base_factory()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    return Variant("unfrozen", base.replace(model_factory=factory))


def _unfrozen_explain(ctx, v, effect):
    frozen, n = _frozen(ctx), ctx.screen.checks["init"]["n_trainable"]
    names = ", ".join(frozen[:4]) + (", ..." if len(frozen) > 4 else "")
    return (
        f"{len(frozen)} parameter tensors are frozen (requires_grad=False: {names}; {n} train); training them "
        f"too {_effect(effect)}. A freeze that was meant (a pretrained backbone) is a choice to revisit; one "
        "that was not (a fine-tuning freeze left in, a `requires_grad_(False)` on the wrong module) is a bug.",
        {"frozen": frozen, "n_trainable": n, "unfrozen_fix": effect},
    )


# --- plateau: optimizer, regularization ---------------------------------------------------------------------


def _adam_variant(ctx):
    # Adam when SGD is configured, at its own LR range test's suggestion kept inside [1e-4, 1e-2], the band
    # Adam is used in (Kingma & Ba's default is 1e-3)
    task = ctx.lab.adapter.task(
        with_overrides(ctx.cfg, {"training.optimizer": "adam", "training.momentum": 0.0})
    )
    batch = max(ctx.task.batch_size, ctx.lab.d.reference_batch_size)
    lr = probes.lr_range_test(task, steps=ctx.lab.d.lr_range_steps, batch_size=batch)
    adam_lr = float(min(1e-2, max(1e-4, lr["suggestion"])))
    return Variant("adam", task.replace(lr=adam_lr), {"lr_range": _short(lr), "lr": adam_lr})


def _adam_explain(ctx, v, effect):
    return (
        f"SGD (momentum {ctx.cfg.training.momentum}) -> Adam (lr {v.info['lr']:.2g} from its LR range test) "
        f"{_effect(effect)}.",
        {"adam_fix": effect, "adam_lr_range": v.info["lr_range"], "adam_lr": v.info["lr"]},
    )


def _regularization(ctx):
    dropout = float(ctx.model.get("dropout") or 0.0)
    return dropout, float(ctx.cfg.training.get("weight_decay") or 0.0)


def _unregularized_variant(ctx):
    cfg = with_overrides(ctx.cfg, {"model.dropout": 0.0, "training.weight_decay": 0.0})
    return Variant("no_regularization", ctx.lab.adapter.task(cfg))


def _unregularized_explain(ctx, v, effect):
    dropout, wd = _regularization(ctx)
    return (
        f"dropout {dropout:g}, weight decay {wd:g}; without both training {_effect(effect)}.",
        {"dropout": dropout, "weight_decay": wd, "no_regularization_fix": effect},
    )


# --- forgetting: data order -----------------------------------------------------------------------------------


def _shuffled_explain(ctx, v, effect):
    order = ctx.screen.checks["order"]
    return (
        f"The training loader yields targets in blocks (runs test z = {order['runs_z']:.1f}, p = "
        f"{order['p_value']:.1e}, lag-1 autocorrelation {order['lag1_autocorrelation']:.2f}); shuffling "
        f"{_effect(effect)}.",
        {
            "order": order,
            "shuffle_fix": effect,
            "forgetting_before": ctx.screen.checks["forgetting"],
            "forgetting_after": stats.forgetting_statistics(ctx.lab.runs[v.name]),
        },
    )


# --- no learning: the training augmentation ------------------------------------------------------------------


def _unaugmented_variant(ctx):
    configured = ctx.lab.learned(ctx.ref.base, ctx.lab.chance_level())
    items = ctx.lab.adapter.unaugmented_train_items()
    return Variant(
        "no_augmentation", ctx.task.replace(train_items=items), {"configured_vs_chance": configured}
    )


def _freed_by_training_longer(ctx, parts):
    """The stuck parts among `parts` that the configured setup, augmentation on, frees when trained longer
    (lab.longer; the same test as for any fix)."""
    if not parts:
        return []
    _, longer = ctx.lab.longer()
    return [p for p in ctx.lab.fix_effect(ctx.ref, longer)["unstuck"] if p in parts]


def _augmentation_confirm(ctx, v, effect, run):
    """An augmentation that keeps each label consistent with its image slows learning at most: the cause is
    the augmentation only when the configured run does not beat the chance level (or leaves a part of the
    output at the input-independent control's level) and the same run without it does, on two seeds. A part
    that training longer with the augmentation frees too was slowed, not blocked: it is no evidence (a healthy
    run's translation, stuck on the doctor's budget, is freed both ways)."""
    if not effect["helped"]:
        return False
    if not v.info["configured_vs_chance"]["learned"]:
        return True
    freed = _freed_by_training_longer(ctx, effect["unstuck"])
    return any(p not in freed for p in effect["unstuck"])


def _augmentation_explain(ctx, v, effect):
    configured = v.info["configured_vs_chance"]
    stuck = f"; {', '.join(effect['unstuck'])} now learn" if effect.get("unstuck") else ""
    freed = _freed_by_training_longer(ctx, effect.get("unstuck")) if effect["helped"] else []
    slowed = (
        f" Trained longer with the augmentation, {', '.join(freed)} learn too: the augmentation slows "
        f"{'them' if len(freed) > 1 else 'it'}, it does not block {'them' if len(freed) > 1 else 'it'}."
        if freed
        else ""
    )
    return (
        f"With the training augmentation the model is {configured['gain_vs_control']:+.0%} vs the chance level's "
        f"loss (p = {configured['p_value']:.2g}); on the same items without it, training {_effect(effect)}{stuck}."
        f"{slowed} "
        "An augmentation that changes an image and its label in ways that disagree (a sign, an axis order, a "
        "label update forgotten) leaves the labels inconsistent with the images: draw a few augmented samples "
        "with their labels. If they agree, the augmentation is too strong for this model to learn through.",
        {
            "configured_vs_chance": configured,
            "no_augmentation_fix": effect,
            "freed_by_training_longer": freed,
        },
    )


TABLE = (
    # The order statistic measures the cause itself (data presented sequentially), so it decides; the shuffled
    # run shows how much it costs on the doctor's budget (often more on a full run).
    Fix(
        "data_not_shuffled", "forgetting", ALWAYS,
        applies=lambda ctx: ctx.screen.checks["order"]["p_value"] < ctx.lab.th.order_alpha,
        variant=lambda ctx: Variant("shuffled", ctx.task.replace(shuffle=True)),
        fix=lambda ctx, v: "training.shuffle=true",
        explain=_shuffled_explain,
        confirm=lambda ctx, v, effect, run: True,
        strength=lambda effect: max(0.0, effect["gain"]),
    ),
    # The input statistics measure the cause itself too: inputs far from mean 0 and std 1 are what a network's
    # initialization and its one learning rate for every layer do not expect, whether or not a normalization
    # layer absorbs them on the doctor's short budget; the standardized run shows what it costs there.
    Fix(
        "poor_input_features", "no_learning", ALWAYS,
        applies=_inputs_off,
        variant=_standardized_variant,
        fix=lambda ctx, v: ctx.lab.adapter.fault_fix("standardize the inputs (per-channel training mean/std)"),
        explain=_standardized_explain,
        confirm=lambda ctx, v, effect, run: True,
        strength=lambda effect: max(0.0, effect["gain"]),
    ),
    Fix(
        "lr_too_high", "loss_bounces", BAD,
        applies=lambda ctx: ctx.task.lr > ctx.lr["lr_valley"],
        variant=_lr_variant,
        fix=lambda ctx, v: f"training.lr={v.info['lr']:.2g}",
        explain=_lr_explain,
        retry=_lower_lr_retry,
    ),
    Fix(
        "lr_too_low", "plateau", BAD,
        applies=lambda ctx: ctx.task.lr < ctx.lr["lr_valley"] / ctx.lab.th.lr_too_low_factor,
        variant=_lr_variant,
        fix=lambda ctx, v: f"training.lr={v.info['lr']:.2g}",
        explain=_lr_explain,
    ),
    Fix(
        "batch_too_small", "loss_bounces", BAD,
        applies=_noisy_batch,
        variant=_batch_variant,
        fix=_batch_fix,
        explain=_batch_explain,
        retry=_lower_lr_retry,
    ),
    Fix(
        "architecture", "no_learning", NO_LEARNING,
        applies=lambda ctx: bool(ctx.model.get("width")),
        variant=_wider_variant,
        fix=lambda ctx, v: " ".join(f"{k}={x}" for k, x in v.info["fix"].items()),
        explain=_wider_explain,
        confirm=_wider_confirm,
        beat_longer=True,
    ),
    Fix(
        "poor_init", "no_learning", NO_LEARNING,
        applies=_init_off,
        variant=_init_variant,
        fix=lambda ctx, v: f"model.init={v.info['init']}",
        explain=_init_explain,
    ),
    # A frozen parameter gets no gradient by request, so the init check's `without_gradient` (the parameters
    # a loss should reach and does not) cannot see it; training it is the fix, and whether it helps decides.
    Fix(
        "implementation_bug", "no_learning", BAD,
        applies=lambda ctx: bool(_frozen(ctx)),
        variant=_unfrozen_variant,
        fix=lambda ctx, v: ctx.lab.adapter.fault_fix("train the frozen parameters (requires_grad=True)"),
        explain=_unfrozen_explain,
    ),
    Fix(
        "not_started", "no_learning", NO_LEARNING,
        applies=lambda ctx: True,
        variant=_longer_variant,
        fix=lambda ctx, v: f"training.epochs={max(ctx.user.training.epochs * 3, v.info['epochs'])}",
        explain=_longer_explain,
        confirm=_longer_confirm,
    ),
    Fix(
        "poor_optimizer", "plateau", BAD,
        applies=lambda ctx: ctx.cfg.training.optimizer == "sgd",
        variant=_adam_variant,
        fix=lambda ctx, v: f"training.optimizer=adam training.lr={v.info['lr']:.2g}",
        explain=_adam_explain,
        beat_longer=True,
    ),
    Fix(
        "too_much_regularization", "plateau", BAD,
        applies=lambda ctx: _regularization(ctx)[0] > 0 or _regularization(ctx)[1] > ctx.lab.th.weight_decay_ignore,
        variant=_unregularized_variant,
        fix=lambda ctx, v: "model.dropout=0.0 training.weight_decay=0.0",
        explain=_unregularized_explain,
        beat_longer=True,
    ),
    # Last: a model that learns nothing while the table's knobs do not explain it, trained on the same items
    # without the augmentation (Task.train_transform). Its label update is code the other rows never test.
    Fix(
        "implementation_bug", "no_learning", NO_LEARNING,
        applies=lambda ctx: ctx.lab.adapter.augmentation is not None,
        variant=_unaugmented_variant,
        fix=lambda ctx, v: ctx.lab.adapter.fault_fix("make the augmentation change each label as it changes the image"),
        explain=_augmentation_explain,
        confirm=_augmentation_confirm,
        last_resort=True,
    ),
)  # fmt: skip
