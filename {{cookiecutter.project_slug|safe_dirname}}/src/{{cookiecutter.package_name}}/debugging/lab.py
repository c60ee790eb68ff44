"""The doctor's lab: the experiment on the doctor's reduced budget, and the training runs made on it.

`budget_config(cfg)` shrinks the experiment (configs/debugging/doctor/default.yaml); `TaskAdapter` builds
`runs.Task`s for config variants of the project's task exactly as training builds them (`training.build`,
an injected fault included, and `training.step_settings`: the same training step as `make train`); `Lab`
trains named runs, keeps them for the report, and measures a fix's effect against a `Reference`.
"""

import copy
import dataclasses
import functools

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from .. import training
from ..loaders import build_loaders
from . import probes, runs, stats


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
    """Builds runs.Tasks (the doctor's training setups) for config variants of the project's task (task.Task)."""

    def __init__(self, cfg):
        self.cfg = cfg
        d = cfg.debugging.doctor
        c = training.build(cfg)  # an injected fault included (debugging.fault)
        self.spec = c.task
        self.device = str(c.device)
        self.train_items = runs.take_items(c.train_loader, d.n_train)
        # The stored training inputs, before augmentation, for the cross-split duplicate check: a copy of a
        # training image in the validation set is a copy of the stored image, not of an augmented view of it.
        stored = torch.utils.data.DataLoader(
            c.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(int(cfg.seed))
        )
        self.stored_train_items = runs.take_items(stored, d.n_train)
        self.val_items = runs.take_items(c.val_loader, d.n_val)
        self.n_val_total = len(c.val_set)
        self.criterion = c.criterion
        self.train_loader = c.train_loader
        self.sets = c.train_set, c.val_set
        # the task's training augmentation (Task.train_transform), or None
        self.augmentation = self.spec.train_transform(cfg)

    def more_train_items(self, n):
        """`n` training items drawn afresh from the training loader (as `train_items` were): a grown budget."""
        return runs.take_items(self.train_loader, n)

    def unaugmented_train_items(self):
        """The training items, in the same order, as a training loader without the augmentation yields them
        (an injected batch fault still applied): what the doctor trains on to see what the augmentation costs."""
        loader, _ = build_loaders(self.cfg, *self.sets, None, self.spec.fault_batch(self.cfg))
        return runs.take_items(loader, len(self.train_items))

    def augmented_val_items(self):
        """Validation samples as the training pipeline gives them (the augmentation, then an injected batch
        fault), from a training loader over the validation set (whole batches: up to `n_val` samples)."""
        loader, _ = build_loaders(self.cfg, self.sets[1], self.sets[1], self.augmentation,
                                  self.spec.fault_batch(self.cfg))  # fmt: skip
        return runs.take_items(loader, len(self.val_items))

    def half_train_items(self, half, n):
        """Up to `n` training items through the training pipeline (augmentation, an injected batch fault), drawn
        from one half of the stored training set only: 0 its first half, 1 its second, in stored order (joined
        recordings, scenes or files stay together there)."""
        train_set = self.sets[0]
        cut = len(train_set) // 2
        index = range(cut) if half == 0 else range(cut, len(train_set))
        part = torch.utils.data.Subset(train_set, list(index))
        loader, _ = build_loaders(
            self.cfg, part, self.sets[1], self.augmentation, self.spec.fault_batch(self.cfg)
        )
        return runs.take_items(loader, n)

    def task(self, cfg=None, **changes):
        cfg = cfg or self.cfg
        t, d = cfg.training, cfg.debugging.doctor
        device = torch.device(self.device)
        step = training.step_settings(cfg, device)  # the precision and clipping `make train` uses

        def model_factory():
            return self.spec.fault_model(cfg, self.spec.build_model(cfg))

        def optimizer_factory(model, lr):
            return training.build_optimizer(with_overrides(cfg, {"training.lr": lr}), model)

        task = runs.Task(
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
            min_epochs=int(d.get("min_epochs") or 1),
            grad_clip=step["grad_clip"],
            amp=step["amp"],
            memory_format=training.memory_format(cfg),
            input_key=self.spec.input_key,
            target_fn=self.spec.target,
            device=self.device,
            seed=int(cfg.seed),
        )
        return task.replace(**changes) if changes else task

    def fault_fix(self, text="fix the data/model code"):
        """The fix for a cause in the data or model code: remove the injected fault, if any, and `text`."""
        fault = self.spec.fault_of(self.cfg)
        return f"debugging.fault=null  # {text}" if fault else text


@dataclasses.dataclass
class Reference:
    """What a fix is measured against: the configured run, the same with another seed (a fix must beat the
    better of the two), and the converged chance level (a fix must beat it too), each None when not run.
    When part of the output did not learn (`stuck`), a fix also helps by making such a part beat the control
    while the total loss does not get worse."""

    base: runs.Run
    reseeded: runs.Run | None = None
    chance: runs.Run | None = None
    control: runs.Run | None = None  # the input-independent control (the stuck terms are measured against it)
    stuck: tuple = ()  # the named parts of the output that did not beat the control in the screen


class Lab:
    """Named training runs on the doctor's budget (kept for the plots) and the measures between them."""

    def __init__(self, cfg, adapter):
        self.cfg = cfg  # the user's (full-size) config: fixes are expressed on it
        self.d = cfg.debugging.doctor
        self.th = self.d.thresholds
        self.adapter = adapter
        self.task = adapter.task()  # the configured setup on the doctor's budget
        self.runs = {}  # name -> runs.Run, for the plots and the report
        self.log = []
        self.lr_range = None  # memo of lr_range_test(), the same whoever asks first
        self.chance = None  # memo of chance_level()
        self.chance_best_epoch = None
        self.grown = None  # memo of grown_budget()
        self.long = None  # memo of longer()
        self.shuffled = None  # memo of shuffled_controls()
        self.overfit_curve = None  # the overfit test's loss curve, for its plot

    def say(self, text):
        self.log.append(text)
        if self.d.verbose:
            print(f"[doctor] {text}", flush=True)

    def train(self, name, task, **kwargs):
        run = runs.train(task, **kwargs)
        self.runs[name] = run
        self.say(f"{name}: val loss {run.val_loss:.4g} ({run.seconds:.1f} s)")
        return run

    def item_losses(self, task, run, items):
        """Eval-mode losses of `run`'s model on `items`: (per-sample losses, {part: per-sample values})."""
        parts = {}
        losses = runs.per_sample_losses(task, run.model, items, parts=parts)
        return losses, {k: np.asarray(v) for k, v in parts.items()}

    def chance_level(self):
        """The input-independent control trained to convergence (Adam at its default LR, longer, best epoch,
        at a batch of at least `reference_batch_size`: a tiny configured batch must not keep the chance level
        from converging): the loss of the best prediction that ignores the input, i.e. "random performance"."""
        if self.chance is None:
            neutral = self.task.replace(
                optimizer_factory=runs.adam_factory,
                lr=1e-3,
                epochs=self.d.longer_epochs,
                batch_size=max(self.task.batch_size, self.d.reference_batch_size),
            )
            run = self.train("chance_level", neutral, items=runs.zero_inputs)
            best = int(np.argmin(run.val_curve)) if run.val_curve else 0
            if run.val_losses_per_epoch:
                run.val_losses = run.val_losses_per_epoch[best]
            run.val_parts = {}
            self.chance, self.chance_best_epoch = run, best + 1
        return self.chance

    def grown_budget(self):
        """The configured setup on a grown budget: twice the doctor's steps and epochs on four times its training
        samples. More steps show a slow learner; more samples show a model that only memorized the doctor's few
        samples. Returns (task, run); trained once, for whichever check asks first."""
        if self.grown is None:
            t = self.task
            more = t.replace(
                epochs=2 * t.epochs,
                max_steps=2 * t.max_steps if t.max_steps else None,
                train_items=self.adapter.more_train_items(4 * len(t.train_items)),
            )
            self.grown = more, self.train("configured_grown_budget", more)
        return self.grown

    def longer(self):
        """The configured setup trained longer (3x the screen's epochs, at most `longer_epochs`): the not_started
        row's fix, and what a knob's fix must beat (engine.against_longer). Returns (task, run); trained once."""
        if self.long is None:
            t = self.task
            more = t.replace(epochs=min(self.d.longer_epochs, max(3 * t.epochs, self.d.epochs)))
            self.long = more, self.train("longer", more)
        return self.long

    def shuffled_controls(self):
        """Two models trained on shuffled targets (other permutations, other initializations): what a model
        learns when the targets are not a function of the input, and how far two such models differ by chance.
        Trained once."""
        if self.shuffled is None:
            t = self.task
            self.shuffled = tuple(
                self.train(
                    name, t.replace(seed=t.seed + k - 1), items=functools.partial(runs.permute_inputs, seed=k)
                )
                for k, name in ((1, "shuffled_targets"), (2, "shuffled_targets_2"))
            )
        return self.shuffled

    def learned_vs_shuffled(self, run):
        """`learned` against both shuffled-target controls: the weaker of the two comparisons. Per-sample tests
        see only the samples' noise, not the model's: with labels paired with the wrong images, two
        shuffled-target controls have differed from each other by 17 % on a translation error at p = 1e-4 on
        the example, so a gain over one such model that the other erases is no evidence of learning."""
        results = [self.learned(run, control) for control in self.shuffled_controls()]
        return min(results, key=lambda r: (r["learned"], r["gain_vs_control"]))

    def lr_range_test(self):
        """LR range test at a batch size where gradient noise does not decide the outcome."""
        if self.lr_range is None:
            ref_batch = max(self.task.batch_size, self.d.reference_batch_size)
            lr = probes.lr_range_test(self.task, steps=self.d.lr_range_steps, batch_size=ref_batch)
            self.lr_range = lr | {"batch_size": ref_batch}
        return self.lr_range

    def learned(self, run, control):
        return stats.learning_vs_control(run, control, self.th.alpha, self.th.min_learning_gain)

    def _term_better(self, base, run, term):
        """The fixed run's `term` significantly and clearly below the reference's (a term does not count as
        fixed because it crept over the control's level by seed-to-seed luck)."""
        if term not in base.val_parts or term not in run.val_parts:
            return False
        p, gain = stats.paired_test(base.val_parts[term], run.val_parts[term])
        return p < self.th.alpha and gain >= self.th.min_fix_gain

    def unstuck(self, base, run, control, stuck):
        """The parts of `stuck` (named parts of the output that do not beat the input-independent `control` in
        `base`) that `run` learns: it beats the control on them and is significantly and clearly below `base`."""
        if run.diverged:
            return []
        learning = self.learned(run, control)
        if not learning["learned"]:
            return []
        still = stats.terms_not_learning(learning, self.th.alpha, self.th.min_learning_gain)
        return [
            t
            for t in stuck
            if t in learning["metrics"] and t not in still and self._term_better(base, run, t)
        ]

    def fix_effect(self, ref, run):
        """Paired permutation test that the fixed run's validation loss is lower, and by how much. The loss
        only: one loss term can improve just because a fix speeds up learning its mean target."""
        base = ref.base
        if ref.reseeded is not None and not ref.reseeded.diverged and ref.reseeded.val_loss < base.val_loss:
            base = ref.reseeded  # a fix must beat the better of two seeds: seed-to-seed luck is not a fix
        r = stats.compare_runs(base, run, self.th.alpha, self.th.min_fix_gain, parts=False)
        unstuck = []
        if ref.stuck and ref.control is not None:
            unstuck = self.unstuck(base, run, ref.control, ref.stuck)
            if r["total_worse"]:
                unstuck = []  # a part learned at the cost of a significantly worse total: not a fix
        # "won't go above random": a fix counts only if the fixed model beats the converged chance level
        above_chance = None if ref.chance is None else self.learned(run, ref.chance)["learned"]
        return {
            "helped": (r["better"] or bool(unstuck)) and above_chance is not False,
            "unstuck": unstuck,
            "beats_chance": above_chance,
            "metric": r["metric"],
            "p_value": r["p_value"],
            "gain": r["gain"],
            "val_loss_before": base.val_loss,
            "val_loss_after": run.val_loss,
            "metrics": r["metrics"],
        }
