"""Stage 4: the failure-mode doctor. Symptom -> cause -> evidence -> fix, for one experiment config.

    python -m <package>.debugging.doctor experiment=<name>               # make doctor EXPERIMENT=<name>
    python -m <package>.debugging.doctor training.lr=3                    # make doctor OVERRIDES="training.lr=3"

It builds the experiment exactly as training does (`training.build`, injected faults included) on a reduced
budget (configs/debugging/doctor/default.yaml: small images, a few hundred samples, short runs), then

1. screens for the talk's symptoms: a short training run with loss curves, compared with Karpathy's
   input-independent control (same run, inputs zeroed), plus cheap data and model checks that run every time;
2. runs the cause probes (src/<package>/debugging/probes.py) that the detected symptoms call for, most of
   them "apply the talk's fix and measure whether it helps" with a paired permutation test;
3. ranks the causes by evidence and writes 4_debugging/doctor/<experiment>/report.md, report.json and plots.

Causes (the fixed vocabulary of report.json's `top_cause`) and the talk's table are in
4_debugging/FAILURE_MODES.md, with the reason for every threshold below.
"""

import copy
import math
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from .. import tracking, training
from ..files import atomic_dir, write_json, write_text
from ..paths import CONFIG_DIR
from . import probes

CAUSES = (
    "architecture",
    "not_started",
    "poor_init",
    "unsolvable",
    "poor_input_features",
    "implementation_bug",
    "lr_too_high",
    "batch_too_small",
    "data_not_shuffled",
    "answer_in_input",
    "test_set_too_small",
    "lr_too_low",
    "poor_optimizer",
    "too_much_regularization",
)
SYMPTOMS = {
    "no_learning": "Network won't go above random performance",
    "loss_bounces": "Loss bounces over epochs",
    "forgetting": "Catastrophic forgetting",
    "suspiciously_good": "Suspiciously good performance",
    "plateau": "Plateaus at a strangely low performance",
}
# Integrity checks first: a leak, a batch-mixing bug or a blocked data order invalidates every comparison of
# training runs below them. Then the causes whose fix was measured, by effect size. `unsolvable` is what is
# left when nothing the doctor tried makes the model beat the controls.
TIER = {
    "implementation_bug": 0,
    "answer_in_input": 0,
    "data_not_shuffled": 1,
    "test_set_too_small": 1,
    "unsolvable": 3,
}


# --- adapting the project's task to the generic probes --------------------------------------------------------


def budget_config(cfg):
    """The experiment's config on the doctor's budget: smaller images and model, lazy loading."""
    d = cfg.debugging.doctor
    small = copy.deepcopy(cfg)
    with open_dict(small):
        pairs = [("data.image_size", d.image_size)] if d.get("image_size") else []
        for item in d.overrides or []:
            if "=" not in str(item):
                raise ValueError(f"debugging.doctor.overrides: '{item}' is not key=value")
            key, value = str(item).split("=", 1)
            pairs.append((key, yaml.safe_load(value)))
        for key, value in pairs:
            if OmegaConf.select(small, key, default="__missing__") != "__missing__":
                OmegaConf.update(small, key, value, merge=False)
        if small.get("model") is None:  # a task without model knobs: nothing to scale
            return small
        if small.model.get("width") and d.width_scale:
            small.model.width = max(1, round(small.model.width * d.width_scale))
        if small.model.get("hidden") and d.width_scale:
            small.model.hidden = max(4, round(small.model.hidden * d.width_scale))
    return small


def with_overrides(cfg, overrides):
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in overrides.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


class TaskAdapter:
    """Builds the probes' training setups (probes.Task) for config variants of the project's task (task.Task)."""

    def __init__(self, cfg):
        self.cfg = cfg
        d = cfg.debugging.doctor
        c = training.build(cfg)  # an injected fault included (debugging.fault)
        self.components = c
        self.spec = c.task
        self.device = str(c.device)
        self.train_items = probes.take_items(c.train_loader, d.n_train)
        # The stored training inputs, before augmentation, for the cross-split duplicate check: a copy of a
        # training image in the validation set is a copy of the stored image, not of an augmented view of it.
        stored = torch.utils.data.DataLoader(
            c.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(int(cfg.seed))
        )
        self.stored_train_items = probes.take_items(stored, d.n_train)
        self.val_items = probes.take_items(c.val_loader, d.n_val)
        self.n_val_total = len(c.val_set)
        self.criterion = c.criterion
        self.train_loader = c.train_loader

    def task(self, cfg=None, **changes):
        cfg = cfg or self.cfg
        t, d = cfg.training, cfg.debugging.doctor

        def model_factory():
            return self.spec.fault_model(cfg, self.spec.build_model(cfg))

        def optimizer_factory(model, lr):
            return training.build_optimizer(with_overrides(cfg, {"training.lr": lr}), model)

        task = probes.Task(
            model_factory=model_factory,
            criterion=self.criterion,
            train_items=self.train_items,
            val_items=self.val_items,
            optimizer_factory=optimizer_factory,
            lr=float(t.lr),
            batch_size=int(t.batch_size),
            shuffle=bool(t.shuffle),
            epochs=int(min(t.epochs, d.epochs)),
            max_steps=int(d.max_steps) if d.get("max_steps") else None,
            grad_clip=t.get("grad_clip"),
            input_key=self.spec.input_key,
            target_fn=self.spec.target,
            device=self.device,
            seed=int(cfg.seed),
        )
        return task.replace(**changes) if changes else task


# --- the diagnosis -----------------------------------------------------------------------------------------


class Doctor:
    def __init__(self, cfg, adapter, out_dir):
        self.cfg = cfg
        self.d = cfg.debugging.doctor
        self.th = self.d.thresholds
        self.adapter = adapter
        self.out = Path(out_dir)
        self.runs = {}  # name -> probes.Run, for the plots
        self.checks = {}
        self.causes = {}
        self.log = []
        self.chance = None  # converged input-independent run (chance level), trained once when first needed
        self.reseeded = None  # the configured run with another seed, set when a symptom calls for fixes
        # set by screen(), which diagnose() runs first: the configured setup, its run and the control run,
        # the training inputs' statistics
        self.task = None
        self.base = self.control = None
        self.input_mean = self.input_std = None
        self.overfit_curve = None  # set by the overfit test, for its plot

    def say(self, text):
        self.log.append(text)
        if self.d.verbose:
            print(f"[doctor] {text}", flush=True)

    def train(self, name, task, **kwargs):
        run = probes.train(task, **kwargs)
        self.runs[name] = run
        self.say(f"{name}: val loss {run.val_loss:.4g} ({run.seconds:.1f} s)")
        return run

    def fix_effect(self, base, run):
        """Paired permutation test that the fixed run's validation loss is lower, and by how much. The loss
        only: a part (e.g. translation) can improve just because a fix speeds up learning the mean target."""
        if (
            self.reseeded is not None
            and not self.reseeded.diverged
            and self.reseeded.val_loss < base.val_loss
        ):
            base = self.reseeded  # a fix must beat the better of two seeds: seed-to-seed luck is not a fix
        r = probes.compare_runs(base, run, self.th.alpha, self.th.min_fix_gain, parts=False)
        above_chance = None
        if self.chance is not None:
            # "won't go above random": a fix counts only if the fixed model beats the converged chance level
            above_chance = probes.learning_vs_control(
                run, self.chance, self.th.alpha, self.th.min_learning_gain
            )
        return {
            "helped": r["better"] and (above_chance is None or above_chance["learned"]),
            "beats_chance": None if above_chance is None else above_chance["learned"],
            "metric": r["metric"],
            "p_value": r["p_value"],
            "gain": r["gain"],
            "val_loss_before": base.val_loss,
            "val_loss_after": run.val_loss,
            "metrics": r["metrics"],
        }

    def add(self, cause, present, strength, evidence, fix, summary, plot=None):
        self.causes[cause] = {
            "id": cause,
            "present": bool(present),
            "strength": float(strength),
            "evidence": evidence,
            "fix": fix,
            "summary": summary,
            "plot": plot,
        }

    # 1. the screen ----------------------------------------------------------------------------------------------

    def screen(self):
        task = self.adapter.task()
        self.task = task
        base = self.train("configured", task)
        control = self.train("input_independent", task, items=zero_inputs)
        self.base, self.control = base, control
        learning = probes.learning_vs_control(base, control, self.th.alpha, self.th.min_learning_gain)
        bounce = probes.bounce_statistics(base, self.th.alpha)
        forgetting = probes.forgetting_statistics(base)
        # the plateau's trend: the training loss per step over the second half (the val curve has too few points)
        steps = base.step_losses
        slope, p_trend = probes.trend_test(steps[len(steps) // 2 :])
        self.checks.update(
            learning=learning,
            bounce=bounce,
            forgetting=forgetting,
            trend_second_half={"slope": slope, "p_value": p_trend},
        )
        self.data_checks(task)
        no_learning = not learning["learned"]
        bounces = bounce["diverged"] or bounce["train_rises"] > 0 or bounce["val_rises_undone"] > 0
        forgets = (
            forgetting["ratio"] is not None
            and forgetting["ratio"] > self.th.forgetting_ratio
            and forgetting["p_value"] < self.th.alpha
        )
        # Plateau: it learned, but its validation loss is little below chance level, the best loss any
        # input-independent model reaches. Chance, not the control above: the control shares the configured
        # recipe, so too much regularization or a poor optimizer handicaps it as much as the model and hides
        # the plateau. Within the doctor's budget a slow crawl (poor optimizer, low LR) and a plateau look the
        # same, and so can a healthy run that is still young: only a fix that helps names a cause.
        flat = not (slope < 0 and p_trend < self.th.alpha)
        whole = len(base.val_curve) >= int(self.cfg.training.epochs)
        gain = None
        if not no_learning:
            chance = self.chance_level()
            gain = 1.0 - base.val_loss / chance.val_loss if chance.val_loss > 0 else 0.0
        plateau = gain is not None and gain < self.th.plateau_gain
        leak = self.checks["shortcut"]["best_single_value_r2"] >= self.th.shortcut_r2
        dup = max(
            (v[k] for v in self.checks["duplicates"].values() for k in v if k.startswith("fraction")),
            default=0,
        )
        small_test = self.checks["test_set"]["n_test"] < self.th.min_test_size
        good = leak or dup >= self.th.duplicate_fraction or small_test
        self.symptoms = {
            "no_learning": {"present": no_learning, **learning},
            "loss_bounces": {"present": bool(bounces), **bounce},
            "forgetting": {"present": bool(forgets), **forgetting},
            "suspiciously_good": {
                "present": bool(good),
                "best_single_value_r2": self.checks["shortcut"]["best_single_value_r2"],
                "duplicate_fraction": dup,
                "n_test": self.checks["test_set"]["n_test"],
                "test_ci95_relative_half_width": self.checks["test_set"]["relative_half_width"],
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
        for name, s in self.symptoms.items():
            s["row"] = SYMPTOMS[name]

    def data_checks(self, task):
        """Cheap checks that run on every report: seconds each, and a leak hides behind normal curves."""
        a = self.adapter
        self.checks["order"] = probes.order_test(task, a.train_loader, n=self.d.n_train)
        self.checks["duplicates"] = probes.duplicates({"train": a.stored_train_items, "val": a.val_items})
        self.checks["shortcut"] = probes.shortcut_probe(task)
        stats = probes.input_statistics(task)
        self.input_mean, self.input_std = stats.pop("mean"), stats.pop("std")
        self.checks["input_statistics"] = stats
        self.checks["test_set"] = probes.test_set_precision(self.base.val_losses, a.n_val_total)
        batch = probes.to_device(probes.collate(a.train_items[: min(16, len(a.train_items))]), a.device)
        model = task.model_factory().to(a.device)
        self.checks["batch_dependency_eval"] = probes.batch_dependency(model, batch)
        self.checks["batch_dependency_train"] = probes.batch_dependency(model, batch, train_mode=True)
        if self.checks["batch_dependency_eval"]["own_gradient"] == 0.0:
            # zero input gradient: disconnected in the code, or only dead weights? Ask a He-initialized copy.
            self.checks["batch_dependency_he_init"] = probes.batch_dependency(
                probes.he_initialized(model), batch
            )
        init = probes.init_statistics(task.model_factory().to(a.device), batch, task.criterion)
        self.checks["init"] = init

    # 2. the cause probes -------------------------------------------------------------------------------------

    def probe_integrity(self):
        th, c = self.th, self.checks
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
            self.add(
                "implementation_bug",
                True,
                1.0,
                {"batch_dependency_eval": dep},
                self.fault_fix(),
                f"Backprop-dependency check failed: {what}.",
            )
        sc = c["shortcut"]
        dup = c["duplicates"]
        frac = max((v[k] for v in dup.values() for k in v if k.startswith("fraction")), default=0.0)
        if sc["best_single_value_r2"] >= th.shortcut_r2 or frac >= th.duplicate_fraction:
            why = []
            if sc["best_single_value_r2"] >= th.shortcut_r2:
                why.append(
                    f"one input value (flat index {sc['best_single_value_index']}) predicts target component "
                    f"{sc['best_single_value_target']} with R^2 = {sc['best_single_value_r2']:.3f} on validation data"
                )
            if frac >= th.duplicate_fraction:
                why.append(f"{frac:.0%} of the validation inputs are exact copies of training inputs")
            self.add(
                "answer_in_input",
                True,
                max(sc["best_single_value_r2"], frac),
                {"shortcut": sc, "duplicates": dup},
                self.fault_fix(),
                "Shortcut found: " + "; ".join(why) + ".",
            )
        ts = c["test_set"]
        if ts["n_test"] < th.min_test_size:
            self.add(
                "test_set_too_small",
                True,
                1 - ts["n_test"] / th.min_test_size,
                {"test_set": ts},
                self.fault_fix(),
                f"The validation set has {ts['n_test']} samples: the 95% CI of the mean loss is "
                f"+-{ts['relative_half_width']:.0%} (bootstrap), and a success rate would be known only to "
                f"+-{1.96 * math.sqrt(0.25 / max(1, ts['n_test'])):.0%}; {th.min_test_size} samples give +-5 points.",
            )

    def probe_order(self):
        order = self.checks["order"]
        if order["p_value"] >= self.th.order_alpha:
            return
        fixed = self.train("shuffled", self.task.replace(shuffle=True))
        effect = self.fix_effect(self.base, fixed)
        f_after = probes.forgetting_statistics(fixed)
        # The order statistic measures the cause itself (data presented sequentially), so it decides; the
        # shuffled run shows how much it costs on the doctor's budget (often more on a full run).
        self.add(
            "data_not_shuffled",
            True,
            max(0.0, effect["gain"]),
            {
                "order": order,
                "shuffle_fix": effect,
                "forgetting_before": self.checks["forgetting"],
                "forgetting_after": f_after,
            },
            "training.shuffle=true",
            f"The training loader yields targets in blocks (runs test z = {order['runs_z']:.1f}, p = "
            f"{order['p_value']:.1e}, lag-1 autocorrelation {order['lag1_autocorrelation']:.2f}); shuffling "
            f"{_effect(effect)}.",
            "curves.png",
        )

    def lr_probe(self):
        """LR range test at a batch size where gradient noise does not decide the outcome."""
        if "lr_range" not in self.checks:
            ref_batch = max(self.task.batch_size, self.d.reference_batch_size)
            lr = probes.lr_range_test(self.task, steps=self.d.lr_range_steps, batch_size=ref_batch)
            lr["batch_size"] = ref_batch
            self.checks["lr_range"] = lr
        return self.checks["lr_range"]

    def chance_level(self):
        """The input-independent control trained to convergence (Adam at its default LR, longer, best epoch):
        the loss of the best prediction that ignores the input, i.e. "random performance" for this loss.
        Trained once per report; from then on a fix counts only if it beats it (fix_effect)."""
        if self.chance is not None:
            return self.chance
        run = self.train(
            "chance_level",
            self.task.replace(optimizer_factory=probes.adam_factory, lr=1e-3, epochs=self.d.longer_epochs),
            items=zero_inputs,
        )
        best = int(np.argmin(run.val_curve)) if run.val_curve else 0
        if run.val_losses_per_epoch:
            run.val_losses = run.val_losses_per_epoch[best]
        run.val_parts = {}
        self.checks["chance_level"] = {"val_loss": run.val_loss, "best_epoch": best + 1}
        self.chance = run
        return run

    def probe_training(self):
        """Causes whose diagnostic is "apply the fix and see": each fix is a short run compared with the
        configured one by a paired permutation test on per-sample validation losses."""
        s, t = self.symptoms, self.task
        bad = s["no_learning"]["present"] or s["loss_bounces"]["present"] or s["plateau"]["present"]
        if not bad:
            return
        self.reseeded = self.train("configured_seed+1", t.replace(seed=t.seed + 1))
        p_seed, diff_seed = probes.paired_test(self.base.val_losses, self.reseeded.val_losses)
        self.checks["seed_spread"] = {
            "val_loss": [self.base.val_loss, self.reseeded.val_loss],
            "relative_difference": diff_seed,
            "p_value": p_seed,
        }
        if s["no_learning"]["present"] and not s["loss_bounces"]["present"]:
            self.chance_level()
        lr = self.lr_probe()
        valley, suggestion = lr["lr_valley"], lr["suggestion"]
        gns = probes.gradient_noise_scale(
            t, model=self.runs["configured"].model if not self.base.diverged else None
        )
        self.checks["gradient_noise"] = gns
        user = self.cfg  # fixes are expressed on the user's (full-size) config

        # learning rate: too high / too low relative to the range test, confirmed by training at the suggestion
        if t.lr > valley or t.lr < valley / self.th.lr_too_low_factor:
            fixed = self.train("lr_suggested", t.replace(lr=suggestion))
            effect = self.fix_effect(self.base, fixed)
            cause = "lr_too_high" if t.lr > valley else "lr_too_low"
            self.add(
                cause,
                effect["helped"],
                effect["gain"],
                {"lr_range": _short(lr), "lr_fix": effect},
                f"training.lr={suggestion:.2g}",
                f"training.lr={t.lr:g} is {'above' if t.lr > valley else 'far below'} the LR range test's "
                f"valley ({valley:.2g}; suggestion {suggestion:.2g}); training at the suggestion {_effect(effect)}.",
                "lr_range_test.png",
            )

        # minibatch too small: noise-dominated gradient (B << B_simple) and a larger batch calms the loss
        b_simple = gns.get("b_simple")
        if b_simple is not None and t.batch_size * self.th.noise_batch_factor <= b_simple and t.lr <= valley:
            big = min(len(t.train_items) // 2, max(t.batch_size * 8, self.d.reference_batch_size))
            fixed = self.train("larger_batch", t.replace(batch_size=big))
            effect = self.fix_effect(self.base, fixed)
            self.add(
                "batch_too_small",
                effect["helped"],
                effect["gain"],
                {"gradient_noise": gns, "batch_fix": effect},
                f"training.batch_size={big}",
                f"At batch size {t.batch_size} the gradient is noise-dominated (noise scale B_simple = "
                f"{b_simple:.0f}, McCandlish et al. 2018); batch size {big} {_effect(effect)}.",
                "curves.png",
            )

        if s["no_learning"]["present"] or s["plateau"]["present"]:
            self.probe_no_learning(user)
        self.probe_plateau(user)

    def probe_no_learning(self, user):
        t, cfg, a = self.task, self.adapter.cfg, self.adapter
        m = cfg.get("model") or OmegaConf.create({})
        # architecture: wider and shallower
        if m.get("width"):
            changes = {"model.width": m.width * 4, "model.hidden": m.get("hidden", 64) * 4}
            fix = {"model.width": user.model.width * 4, "model.hidden": user.model.get("hidden", 64) * 4}
            if m.get("depth", 1) > 1:
                changes["model.depth"] = fix["model.depth"] = max(1, m.depth // 2)
            fixed = self.train("wider", a.task(with_overrides(cfg, changes)))
            effect = self.fix_effect(self.base, fixed)
            self.add(
                "architecture",
                effect["helped"],
                effect["gain"],
                {"wider_fix": effect, "model": dict(changes)},
                _overrides(fix),
                f"A 4x wider{' and shallower' if 'model.depth' in changes else ''} network "
                f"{_effect(effect)}.",
                "curves.png",
            )
        # initialization: He-normal, and the statistics at init
        init = self.checks["init"]
        if m.get("init") is not None:
            new = "he_normal" if m.init != "he_normal" else "default"
            fixed = self.train("he_init", a.task(with_overrides(cfg, {"model.init": new})))
            effect = self.fix_effect(self.base, fixed)
            he = [r["weight_std_over_he"] for r in init["layers"]]
            self.add(
                "poor_init",
                effect["helped"],
                effect["gain"],
                {
                    "init_fix": effect,
                    "loss_at_init": init["loss_at_init"],
                    "control_val_loss": self.control.val_loss,
                    "weight_std_over_he_min": min(he),
                    "weight_std_over_he_max": max(he),
                    "layers": init["layers"],
                },
                f"model.init={new}",
                f"model.init={m.init}: loss at init {init['loss_at_init']:.3g} vs {self.control.val_loss:.3g} for "
                f"the input-independent control; weight std / He-normal std ranges {min(he):.2g}..{max(he):.2g}; "
                f"{new} init {_effect(effect)}.",
                "curves.png",
            )
        # input features: standardize the inputs with the training set's statistics
        st = self.checks["input_statistics"]
        off = st["max_abs_mean"] > self.th.input_mean_max or not (
            1 / self.th.input_std_factor <= st["min_std"] and st["max_std"] <= self.th.input_std_factor
        )
        if off:
            variant = with_overrides(cfg, {"model.normalize_input": False}) if "normalize_input" in m else cfg
            base_task = a.task(variant)
            mean, std = self.input_mean, self.input_std

            def factory(base_factory=base_task.model_factory):
                return probes.Standardize(base_factory(), mean, std)

            fixed = self.train("standardized_input", base_task.replace(model_factory=factory))
            effect = self.fix_effect(self.base, fixed)
            self.add(
                "poor_input_features",
                effect["helped"],
                effect["gain"],
                {"input_statistics": st, "standardize_fix": effect},
                self.fault_fix("standardize the inputs (per-channel mean/std of the training set)"),
                f"Inputs have channel means {_fmt(st['channel_mean'])} and stds {_fmt(st['channel_std'])}; "
                f"standardizing them {_effect(effect)}.",
                "curves.png",
            )
        # not started: train longer (is the trend significant?)
        longer_epochs = min(self.d.longer_epochs, max(3 * t.epochs, self.d.epochs))
        slope, p_trend = probes.trend_test(self.base.val_curve)
        fixed = self.train("longer", t.replace(epochs=longer_epochs))
        effect = self.fix_effect(self.base, fixed)
        fixed_learning = probes.learning_vs_control(
            fixed, self.chance or self.control, self.th.alpha, self.th.min_learning_gain
        )
        self.checks["longer_learns"] = fixed_learning["learned"]
        # Training longer helps any run the doctor cut short. It implicates the configured schedule only when
        # the screen ran all of it; otherwise the short schedule was the doctor's own budget.
        whole = self.symptoms["plateau"]["screen_ran_whole_schedule"]
        self.add(
            "not_started",
            whole and effect["helped"] and fixed_learning["learned"],
            effect["gain"],
            {
                "trend": {"slope_per_epoch": slope, "p_value": p_trend},
                "longer_fix": effect,
                "epochs": [t.epochs, longer_epochs],
                "screen_ran_whole_schedule": whole,
            },
            f"training.epochs={max(user.training.epochs * 3, longer_epochs)}",
            f"Over the configured {t.epochs} epoch(s) the val loss trend is {slope:+.3g}/epoch (p = {p_trend:.3g}); "
            f"{longer_epochs} epochs: {_effect(effect)}, and "
            f"{'do' if fixed_learning['learned'] else 'do not'} beat the input-independent control"
            + (
                "."
                if whole
                else f" (the screen ran {len(self.base.val_curve)} of the configured {user.training.epochs} "
                "epochs, so this does not implicate the schedule)."
            ),
            "curves.png",
        )
        # The overfit test and the shuffled-target control decide only between `implementation_bug` and
        # `unsolvable` for a model that does not learn (probe_residual): a model that learned needs neither.
        if not self.symptoms["no_learning"]["present"]:
            return
        # implementation bug: can it overfit a small subset?
        over = probes.overfit_subset(
            t,
            n=self.d.overfit_samples,
            steps=self.d.overfit_steps,
            lr=min(t.lr, self.lr_probe()["suggestion"]) if t.lr > self.lr_probe()["lr_valley"] else None,
            required_drop=self.th.overfit_drop,
        )
        self.checks["overfit"] = {k: v for k, v in over.items() if k != "curve"}
        self.overfit_curve = over["curve"]
        # unsolvable: does the model beat a shuffled-target control (a permutation test)?
        shuffled = self.train("shuffled_targets", t, items=lambda items: probes.permute_inputs(items, seed=1))
        vs_shuffled = probes.learning_vs_control(
            self.base, shuffled, self.th.alpha, self.th.min_learning_gain
        )
        self.checks["vs_shuffled_targets"] = vs_shuffled

    def probe_plateau(self, user):
        cfg, a = self.adapter.cfg, self.adapter
        # optimizer: Adam when SGD is configured, at its own LR range test's suggestion kept inside
        # [1e-4, 1e-2], the band Adam is used in (Kingma & Ba's default is 1e-3)
        if cfg.training.optimizer == "sgd":
            adam_cfg = with_overrides(cfg, {"training.optimizer": "adam", "training.momentum": 0.0})
            adam_task = a.task(adam_cfg)
            lr = probes.lr_range_test(
                adam_task,
                steps=self.d.lr_range_steps,
                batch_size=max(self.task.batch_size, self.d.reference_batch_size),
            )
            adam_lr = float(min(1e-2, max(1e-4, lr["suggestion"])))
            fixed = self.train("adam", adam_task.replace(lr=adam_lr))
            effect = self.fix_effect(self.base, fixed)
            self.add(
                "poor_optimizer",
                effect["helped"],
                effect["gain"],
                {"adam_fix": effect, "adam_lr_range": _short(lr), "adam_lr": adam_lr},
                f"training.optimizer=adam training.lr={adam_lr:.2g}",
                f"SGD (momentum {cfg.training.momentum}) -> Adam (lr {adam_lr:.2g} from its LR range test) "
                f"{_effect(effect)}.",
                "curves.png",
            )
        # regularization: ablate dropout and weight decay
        dropout, wd = (
            float((cfg.get("model") or {}).get("dropout") or 0.0),
            float(cfg.training.get("weight_decay") or 0.0),
        )
        if dropout > 0 or wd > self.th.weight_decay_ignore:
            fixed = self.train(
                "no_regularization",
                a.task(with_overrides(cfg, {"model.dropout": 0.0, "training.weight_decay": 0.0})),
            )
            effect = self.fix_effect(self.base, fixed)
            self.add(
                "too_much_regularization",
                effect["helped"],
                effect["gain"],
                {"dropout": dropout, "weight_decay": wd, "no_regularization_fix": effect},
                "model.dropout=0.0 training.weight_decay=0.0",
                f"dropout {dropout:g}, weight decay {wd:g}; without both training {_effect(effect)}.",
                "curves.png",
            )

    def probe_residual(self):
        """Implementation bug by a failed overfit test, then `unsolvable`, when nothing else explains it."""
        if not self.symptoms["no_learning"]["present"] or any(c["present"] for c in self.causes.values()):
            return
        over = self.checks.get("overfit")
        if over and not over["passed"]:
            self.add(
                "implementation_bug",
                True,
                over["drop"],
                {"overfit": over},
                self.fault_fix(),
                f"Cannot overfit {over['n']} samples: the loss fell by {over['drop']:.0%} in {over['steps']} steps "
                f"(pass: >= {over['required_drop']:.0%}). A working model memorizes a handful of samples.",
                "overfit.png",
            )
            return
        if self.checks.get("longer_learns"):
            return  # it beats the control when trained longer: slow within the doctor's budget, not unsolvable
        vs = self.checks.get("vs_shuffled_targets", {})
        self.add(
            "unsolvable",
            True,
            1.0 - max(0.0, vs.get("gain_vs_control", 0.0)),
            {
                "vs_shuffled_targets": vs,
                "vs_input_independent": self.checks["learning"],
                "overfit": over,
                "tried": sorted(k for k in self.runs if k not in ("configured",)),
            },
            self.fault_fix("check that the targets belong to their inputs (would a human solve it?)"),
            f"No variant beat the controls: the configured model is {vs.get('gain_vs_control', 0):+.0%} vs a "
            f"model trained on shuffled targets (p = {vs.get('p_value', 1):.3g}), yet it can overfit "
            f"{(over or {}).get('n', 0)} samples; wider nets, other inits, LRs and longer training did not help.",
            "curves.png",
        )

    def fault_fix(self, text="fix the data/model code"):
        fault = self.adapter.spec.fault_of(self.adapter.cfg)
        return f"debugging.fault=null  # {text}" if fault else text

    # 3. ranking and the report ---------------------------------------------------------------------------------

    def diagnose(self):
        start = time.perf_counter()
        self.screen()
        self.probe_integrity()
        self.probe_order()
        if not any(self.causes.get(c, {}).get("present") for c in ("implementation_bug", "answer_in_input")):
            self.probe_training()
            self.probe_residual()
        ranked = sorted(
            self.causes.values(), key=lambda c: (not c["present"], TIER.get(c["id"], 2), -c["strength"])
        )
        for i, c in enumerate(ranked):
            c["rank"] = i + 1 if c["present"] else None
        top = ranked[0]["id"] if ranked and ranked[0]["present"] else "none"
        return {
            "top_cause": top,
            "causes": ranked,
            "symptoms": self.symptoms,
            "checks": _jsonable(self.checks),
            "runs": {k: r.summary() for k, r in self.runs.items()},
            "seconds": round(time.perf_counter() - start, 1),
            "log": self.log,
        }


def zero_inputs(items):
    return probes.zero_inputs(items)


def _effect(effect):
    """'lowers val rot_err_deg by 23% (p = 0.0001)' for a fix_effect result."""
    verb = "lowers" if effect["gain"] >= 0 else "raises"
    return f"{verb} val {effect['metric']} by {abs(effect['gain']):.0%} (p = {effect['p_value']:.2g})"


def _short(lr):
    return {k: v for k, v in lr.items() if k not in ("lrs", "losses")}


def _fmt(values):
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _overrides(d):
    return " ".join(f"{k}={v}" for k, v in d.items())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def plot(doctor, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in doctor.runs.items():
        steps = np.asarray(run.step_losses, dtype=float)
        if len(steps):
            k = max(1, len(steps) // 50)
            smooth = np.convolve(steps, np.ones(k) / k, mode="valid")
            ax1.plot(smooth, label=name, lw=2 if name == "configured" else 1)
        if run.val_curve:
            ax2.plot(
                range(1, len(run.val_curve) + 1),
                run.val_curve,
                marker="o",
                label=name,
                lw=2 if name == "configured" else 1,
            )
    for ax, title in ((ax1, "training loss per step (moving average)"), (ax2, "validation loss per epoch")):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step" if ax is ax1 else "epoch")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=90)
    plt.close(fig)
    files.append("curves.png")
    lr = doctor.checks.get("lr_range")
    if lr and lr["lrs"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lr["lrs"], lr["losses"])
        ax.axvline(lr["suggestion"], color="g", ls="--", label=f"suggestion {lr['suggestion']:.2g}")
        ax.axvline(doctor.task.lr, color="r", ls=":", label=f"configured {doctor.task.lr:.2g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed training loss")
        ax.set_title("LR range test")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "lr_range_test.png", dpi=90)
        plt.close(fig)
        files.append("lr_range_test.png")
    if doctor.overfit_curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(doctor.overfit_curve)
        ax.set_yscale("log")
        ax.set_title(f"overfit {doctor.d.overfit_samples} samples")
        ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "overfit.png", dpi=90)
        plt.close(fig)
        files.append("overfit.png")
    return files


def markdown(name, result):
    top = result["top_cause"]
    lines = [f"# Doctor report: {name}", ""]
    present = [c for c in result["causes"] if c["present"]]
    if top == "none":
        lines += ["**No failure mode found.** Evidence:", ""]
        ln = result["symptoms"]["no_learning"]
        lines += [
            f"- the model beats the input-independent control by {ln['gain_vs_control']:.0%} "
            f"(paired permutation test p = {ln['p_value']:.2g});",
            f"- training loss never rose significantly between epochs (max rise z = "
            f"{result['symptoms']['loss_bounces']['max_rise_z']:.2f});",
            f"- no shortcut (best single input value R^2 = {result['checks']['shortcut']['best_single_value_r2']:.2f}), "
            f"no train/val duplicates, data order looks random (runs test p = {result['checks']['order']['p_value']:.2g}), "
            f"validation set of {result['checks']['test_set']['n_test']} samples;",
            "- the model keeps samples apart (backprop-dependency check passed).",
        ]
        seen = [s["row"] for s in result["symptoms"].values() if s["present"]]
        if seen:
            lines.append(
                f"- the screen, on the doctor's reduced budget, looked like: {'; '.join(seen)}; but no fix the "
                "doctor tried was significantly better (table below), which is how a healthy run that is "
                "still young looks."
            )
        lines.append("")
    else:
        c = present[0]
        lines += [f"**Top cause: `{top}`** - {c['summary']}", "", f"Fix: `{c['fix']}`", ""]
    lines += ["## Symptoms", "", "| symptom | talk's row | present |", "|---|---|---|"]
    for sid, s in result["symptoms"].items():
        lines.append(f"| `{sid}` | {s['row']} | {'**yes**' if s['present'] else 'no'} |")
    lines += [
        "",
        "## Causes (ranked by evidence)",
        "",
        "| rank | cause | present | evidence | fix |",
        "|---|---|---|---|---|",
    ]
    for c in result["causes"]:
        plot_ref = f" ([plot]({c['plot']}))" if c.get("plot") else ""
        lines.append(
            f"| {c['rank'] or '-'} | `{c['id']}` | {'**yes**' if c['present'] else 'no'} | "
            f"{c['summary']}{plot_ref} | `{c['fix']}` |"
        )
    lines += [
        "",
        "## Runs (doctor's reduced budget)",
        "",
        "| run | val loss | diverged | seconds |",
        "|---|---|---|---|",
    ]
    for k, r in result["runs"].items():
        lines.append(f"| {k} | {r['val_loss']:.4g} | {r['diverged']} | {r['seconds']} |")
    lines += ["", "![curves](curves.png)", ""]
    if "lr_range_test.png" in result.get("plots", []):
        lines += ["![LR range test](lr_range_test.png)", ""]
    lines += [
        f"Doctor wall time: {result['seconds']} s. Causes and thresholds: 4_debugging/FAILURE_MODES.md.",
        "",
    ]
    return "\n".join(lines)


def experiment_name(cfg):
    """The report folder's name: `debugging.doctor.name`, else the experiment's (tracking.experiment_name)."""
    return str(cfg.debugging.doctor.get("name") or tracking.experiment_name(cfg))


def run_doctor(cfg, name=None):
    """Diagnose `cfg`; writes <doctor.output>/<name>/report.{md,json} + plots and returns the report dict."""
    name = name or experiment_name(cfg)
    d = cfg.debugging.doctor
    if d.get("threads"):
        torch.set_num_threads(int(d.threads))
    small = budget_config(cfg)
    adapter = TaskAdapter(small)
    out = Path(d.output) / name
    with atomic_dir(out) as tmp:
        doctor = Doctor(cfg, adapter, tmp)
        result = doctor.diagnose()
        result = {
            "experiment": name,
            "top_cause": result.pop("top_cause"),
            **result,
            "budget": OmegaConf.to_container(d, resolve=True),
        }
        result["plots"] = plot(doctor, tmp)
        write_json(tmp / "report.json", _jsonable(result))
        write_text(tmp / "report.md", markdown(name, result))
    run = tracking.start_run(cfg, "doctor")
    run.log(
        {"doctor/top_cause": result["top_cause"], "doctor/seconds": result["seconds"]}
        | {f"doctor/symptom/{k}": float(v["present"]) for k, v in result["symptoms"].items()}
    )
    for file in result["plots"]:
        from PIL import Image

        run.log_image(f"doctor/{Path(file).stem}", np.asarray(Image.open(out / file)))
    run.finish()
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    try:
        result = run_doctor(cfg)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    name = result["experiment"]
    top = result["top_cause"]
    fix = next((c["fix"] for c in result["causes"] if c["present"]), None)
    print(
        f"doctor: {name}: " + ("no failure mode found" if top == "none" else f"top cause {top}; fix: {fix}")
    )
    print(f"report: {Path(cfg.debugging.doctor.output) / name / 'report.md'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
