"""Rows of the doctor's fix table (debugging/fixes.TABLE) that decide by a measurement as well as by a fix
that helps, run through the engine with the training runs scripted."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from {{ cookiecutter.package_name }}.debugging import causes, doctor, engine, fixes, probes, runs

TH = SimpleNamespace(
    init_std_factor=3.0, generalization_gap=0.1, alpha=0.01, min_fix_gain=0.05, noise_batch_factor=1
)


def row(cause):
    return next(r for r in fixes.TABLE if r.cause == cause)


def run(train_loss, val_loss):
    """A finished run whose last epoch's training loss and validation loss are these."""
    return runs.Run(
        step_losses=[train_loss] * 4, epoch_step_losses=[[train_loss] * 4], val_curve=[val_loss],
        val_losses=np.full(8, val_loss), val_losses_per_epoch=[np.full(8, val_loss)], val_parts={},
        forgetting=[], diverged=False, seconds=0.0,
    )  # fmt: skip


class ScriptedLab:
    """Trains nothing: every variant's run (and its repeat on the next seed) is the same, and every fix helps
    by 11 %."""

    def __init__(self):
        self.th, self.d = TH, SimpleNamespace(reference_batch_size=32)
        self.adapter = SimpleNamespace(task=lambda cfg: runs.Task(None, None, [], []))
        self.runs = {}

    def train(self, name, task, **kwargs):
        self.runs[name] = run(5.0, 6.0)
        return self.runs[name]

    def fix_effect(self, ref, fixed):
        return {"helped": True, "unstuck": [], "metric": "loss", "p_value": 5e-4, "gain": 0.11,
                "val_loss_after": fixed.val_loss}  # fmt: skip


def context(model, base=None, init_ratios=(0.4, 0.41), whole_schedule=True):
    cfg = OmegaConf.create({"model": model, "training": {"epochs": 8}})
    screen = SimpleNamespace(
        base=base or run(6.3, 6.6),
        checks={"init": {"layers": [{"weight_std_over_he": r} for r in init_ratios]}},
        symptoms={"plateau": {"screen_ran_whole_schedule": whole_schedule}},
    )
    lab = ScriptedLab()
    lab.cfg = cfg
    lab.adapter.cfg = cfg
    return engine.Context(lab, screen, ref=None)


@pytest.mark.parametrize(
    "ratios, tried",
    [((0.39, 0.42), False), ((0.0, 0.0), True), ((0.41, 0.2), True), ((0.4, 4.0), True)],
)
def test_poor_init_is_tried_only_when_some_layer_is_off_he_by_more_than_the_factor(ratios, tried):
    """PyTorch's default init (0.41x He-normal's std) is not a poor init however much He init helps a run;
    all-zero weights, a layer at a fifth of He's std or at four times it are."""
    ctx = context({"init": "default", "width": 8}, init_ratios=ratios)
    assert row("poor_init").applies(ctx) is tried
    assert not row("poor_init").applies(context({"width": 8}, init_ratios=ratios))  # no init knob


@pytest.mark.parametrize("train_loss, confirmed", [(6.5, True), (5.6, False)])
def test_a_wider_network_that_helps_means_architecture_only_without_a_generalization_gap(
    train_loss, confirmed
):
    """High bias (training loss as high as validation: 6.5 vs 6.6) -> too small a network; a network that fits
    its training data 15 % better than held-out data (5.6 vs 6.6) is not short of capacity, even when a
    wider one lowers the validation loss by 11 %."""
    ctx = context({"init": "default", "width": 8, "hidden": 32}, base=run(train_loss, 6.6))
    found = engine.run(ctx, [row("architecture")])["architecture"]
    assert set(ctx.lab.runs) == {"wider", "wider_seed+1"}  # the fix helped, so it was repeated
    assert found["present"] is confirmed
    assert found["evidence"]["generalization_gap"] == pytest.approx(1 - train_loss / 6.6)
    assert ("variance, not a lack of capacity" in found["summary"]) is not confirmed


def noisy_run(val_loss, seed):
    """A run whose 64 per-sample validation losses scatter around `val_loss` (what a paired test sees)."""
    r = run(val_loss - 0.5, val_loss)
    r.val_losses = val_loss + np.random.default_rng(seed).normal(0.0, 0.3, 64)
    return r


@pytest.mark.parametrize(
    "cause, longer_val, whole_schedule, present",
    [
        ("architecture", 6.6, False, True),  # the fix (6.0) beats training longer by 9 %
        ("architecture", 5.9, False, False),  # training longer does as well: a slow run, not a cause
        ("architecture", 5.9, True, True),  # the screen ran the whole schedule: longer is a config change
        ("too_much_regularization", 6.1, False, False),  # 2 % better than longer: under min_fix_gain
        ("poor_optimizer", 6.1, False, False),
    ],
)
def test_a_knob_fix_must_help_more_than_training_longer_when_the_budget_cut_the_schedule(
    cause, longer_val, whole_schedule, present
):
    """A healthy run that is slow on the doctor's budget gains from a wider network, no regularization and Adam
    on both seeds; the fix names a cause only if it also beats the same setup trained longer."""
    ctx = context(
        {"width": 8, "hidden": 32, "dropout": 0.5}, base=run(6.5, 6.6), whole_schedule=whole_schedule
    )
    ctx.lab.cfg.training.optimizer = "sgd"
    ctx.lab.cfg.training.momentum = 0.9
    ctx.lab.cfg.training.weight_decay = 0.0
    ctx.lab.task = runs.Task(None, None, [], [], epochs=8)
    ctx.lab.train = lambda name, task, **kw: ctx.lab.runs.setdefault(name, noisy_run(6.0, seed=1))
    longer_calls = []

    def longer():
        longer_calls.append(1)
        return ctx.lab.task.replace(epochs=16), noisy_run(longer_val, seed=2)

    ctx.lab.longer = longer
    variant = row(cause).variant
    if cause == "poor_optimizer":  # its variant runs an LR range test: script the variant instead
        variant = lambda c: engine.Variant("adam", c.lab.task, {"lr_range": {}, "lr": 1e-3})  # noqa: E731
    found = engine.run(ctx, [dataclasses.replace(row(cause), variant=variant)])[cause]
    assert found["present"] is present
    assert bool(longer_calls) is not whole_schedule
    assert ("no more than training longer" in found["summary"]) is (not present)


@pytest.mark.parametrize("lr, fixed_lr, fix", [(0.02, 0.012, "training.batch_size=32 training.lr=0.012"),
                                               (0.003, 0.003, "training.batch_size=32")])  # fmt: skip
def test_the_larger_batch_runs_at_an_lr_the_range_test_calls_safe(lr, fixed_lr, fix):
    """The batch row's variant keeps the configured LR unless the LR range test (run at the reference batch)
    suggests a lower one: an LR that only a tiny batch's noise kept in check is not the larger batch's."""
    ctx = context({"width": 8})
    ctx.lab.task = runs.Task(None, None, list(range(2048)), [], lr=lr, batch_size=2, epochs=8, max_steps=512)
    ctx.lr, ctx.noise = {"suggestion": 0.012, "lr_valley": 0.12}, {"b_simple": 39.0}
    v = row("batch_too_small").variant(ctx)
    assert (v.task.batch_size, v.task.lr) == (32, pytest.approx(fixed_lr))
    assert row("batch_too_small").fix(ctx, v) == fix


def integrity_of(shortcut):
    lab = SimpleNamespace(
        th=SimpleNamespace(
            shortcut_r2=0.9, shortcut_candidate_r2=0.4, shortcut_confirm_share=0.5,
            duplicate_fraction=0.01, batch_dependency_ratio=1e-6, min_test_size=385,
        ),
        adapter=SimpleNamespace(fault_fix=lambda text="fix the data/model code": text),
    )  # fmt: skip
    checks = {
        "batch_dependency_eval": {"ratio": 0.0, "own_gradient": 1.0},
        "init": {"without_gradient": [], "n_trainable": 4},
        "shortcut": shortcut,
        "duplicates": {"train/val": {"shared": 0, "fraction_of_val": 0.0}},
        "test_set": {"n_test": 400, "relative_half_width": 0.03},
    }
    return causes.integrity(lab, SimpleNamespace(checks=checks))


def shortcut_numbers(trivial, after):
    return {"best_single_value_r2": 0.4, "best_single_value_index": 7, "best_single_value_target": 0,
            "trivial_model_r2": trivial, "trivial_model": "4x4 thumbnail", "trivial_model_target": 2,
            "trivial_model_r2_per_image_standardized": after}  # fmt: skip


@pytest.mark.parametrize(
    "after, carrier", [(0.05, "brightness, contrast or colour balance"), (0.93, "coarse layout")]
)
def test_a_leak_only_a_trivial_model_finds_is_answer_in_input(after, carrier):
    """No single pixel gives the answer away (R^2 0.4), a linear model on a 4x4 thumbnail does (0.97):
    `answer_in_input`, saying whether standardizing each image removed it (brightness) or not (layout)."""
    found = integrity_of(shortcut_numbers(0.97, after))
    assert list(found) == ["answer_in_input"] and found["answer_in_input"]["strength"] == pytest.approx(0.97)
    summary = found["answer_in_input"]["summary"]
    assert "4x4 thumbnail" in summary and "component 2" in summary and carrier in summary


@pytest.mark.parametrize(
    "trivial, after, leak",
    [(0.58, 0.22, True), (0.41, 0.2, True), (0.46, 0.37, False), (0.58, 0.3, False), (0.38, 0.0, False),
     (0.58, None, False)],
)  # fmt: skip
def test_a_weaker_candidate_is_a_leak_only_when_removing_the_statistic_confirms_it(trivial, after, leak):
    """Below `shortcut_r2`, a trivial model's R^2 at or above `shortcut_candidate_r2` (0.4) is a leak when
    standardizing every image on its own leaves at most half of it (a brightness-keyed answer: 0.58 -> 0.22);
    a layout correlation that survives the standardization (0.46 -> 0.37), a drop to more than half, a
    number below the candidate level or one never re-measured is not."""
    found = integrity_of(shortcut_numbers(trivial, after))
    assert bool(found) == leak
    if leak:
        assert "brightness, contrast or colour balance" in found["answer_in_input"]["summary"]


class NoHelpLab(ScriptedLab):
    """Every fix changes nothing."""

    def fix_effect(self, ref, fixed):
        return {"helped": False, "unstuck": [], "metric": "loss", "p_value": 0.6, "gain": 0.0,
                "val_loss_after": fixed.val_loss}  # fmt: skip


@pytest.mark.parametrize("scale, off", [(255.0, True), (1 / 255, True), (1.0, False)])
def test_inputs_far_from_standardized_are_poor_input_features_whatever_the_curves_show(scale, off):
    """The input statistics decide, like the data order: images at 0..255 (a batch normalization after the
    first layer can absorb that on a short run, so standardizing helps nothing there) or at 0..1/255 are
    `poor_input_features` with no training symptom at all; images in [0, 1] are not."""
    th = SimpleNamespace(input_mean_max=3.0, input_std_factor=10.0)
    rng = np.random.default_rng(0)
    items = [
        {"image": torch.as_tensor(rng.random((3, 8, 8)) * scale, dtype=torch.float32)} for _ in range(16)
    ]
    task = runs.Task(None, None, items, [])
    lab = NoHelpLab()
    lab.th, lab.cfg = th, OmegaConf.create({"model": {"width": 8}, "training": {"epochs": 8}})
    lab.adapter.cfg, lab.adapter.fault_fix = lab.cfg, lambda text: text
    lab.task = task
    no_symptoms = SimpleNamespace(present=lambda *names: False, base=run(6.0, 6.0),
                                  checks={"input_statistics": probes.input_statistics(task)})  # fmt: skip
    ctx = engine.Context(lab, no_symptoms, ref=None)
    tried = engine.rows(fixes.TABLE, no_symptoms, training_fixes=False)
    assert row("poor_input_features") in tried  # no training symptom needed
    found = engine.run(ctx, [row("poor_input_features")])
    if not off:
        assert "poor_input_features" not in found
        return
    f = found["poor_input_features"]
    assert f["present"]
    assert "standardized_input_seed+1" not in lab.runs  # decided by the statistic, not repeated
    assert "raises" not in f["summary"] and "lowers val loss by 0%" in f["summary"]
    assert f["fix"] == "standardize the inputs (per-channel training mean/std)"


class HelpsOnlyLab(ScriptedLab):
    """Every fix helps by 11 % except the runs named in `fail` (they raise the loss by 2 %)."""

    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    def fix_effect(self, ref, fixed):
        name = next(n for n, r in self.runs.items() if r is fixed)
        gain = -0.02 if name in self.fail else 0.11
        return {"helped": gain > 0, "unstuck": [], "metric": "loss", "p_value": 5e-4 if gain > 0 else 0.9,
                "gain": gain, "val_loss_after": fixed.val_loss}  # fmt: skip

    def train(self, name, task, **kwargs):
        self.runs[name] = run(5.0, 6.0)  # a new object per run: fix_effect tells them apart
        return self.runs[name]


@pytest.mark.parametrize(
    "cause, lr, fail, runs_trained, present, fix",
    [
        # the suggestion did not help, a third of it did (and again on the next seed)
        ("batch_too_small", 0.02, {"larger_batch"}, {"larger_batch", "larger_batch_third",
         "larger_batch_third_seed+1"}, True, "training.batch_size=32 training.lr=0.004"),
        ("lr_too_high", 0.5, {"lr_suggested"}, {"lr_suggested", "lr_suggested_third",
         "lr_suggested_third_seed+1"}, True, "training.lr=0.004"),
        # neither helped: the first try is the one reported
        ("batch_too_small", 0.02, {"larger_batch", "larger_batch_third"},
         {"larger_batch", "larger_batch_third"}, False, "training.batch_size=32 training.lr=0.012"),
        # the suggestion helped: nothing more to try
        ("lr_too_high", 0.5, set(), {"lr_suggested", "lr_suggested_seed+1"}, True, "training.lr=0.012"),
        # the larger batch kept the configured LR (below the suggestion): no LR of the range test's to doubt
        ("batch_too_small", 0.003, {"larger_batch"}, {"larger_batch"}, False, "training.batch_size=32"),
    ],
)  # fmt: skip
def test_an_lr_from_the_range_test_that_did_not_help_is_tried_again_at_a_third(
    cause, lr, fail, runs_trained, present, fix
):
    """The range test's suggestion (valley / 10) is read off one short noisy curve: a loss-bounces fix at it
    that does not help is tried once more at a third of it, and the report keeps the try that helped, with
    the other try's numbers beside it."""
    ctx = context({"width": 8})
    lab = HelpsOnlyLab(fail)
    lab.cfg, lab.adapter.cfg = ctx.lab.cfg, ctx.lab.cfg
    lab.task = runs.Task(None, None, list(range(2048)), [], lr=lr, batch_size=2, epochs=8, max_steps=512)
    ctx = engine.Context(lab, ctx.screen, ref=None, lr={"suggestion": 0.012, "lr_valley": 0.12},
                         noise={"b_simple": 39.0})  # fmt: skip
    found = engine.run(ctx, [row(cause)])[cause]
    assert set(lab.runs) == runs_trained
    assert found["present"] is present
    assert found["fix"] == fix
    retried = any(name.endswith("_third") for name in runs_trained)
    assert ("the other try" in found["summary"]) is retried


AUGMENTATION = next(r for r in fixes.TABLE if r.variant is fixes._unaugmented_variant)


class AugmentationLab(ScriptedLab):
    """The configured run beats the chance level or not; the run without the augmentation helps or not, and
    makes the parts in `unstuck` learn; the configured run trained longer frees them too or not."""

    def __init__(self, beats_chance, helped, unstuck=(), longer_frees=False):
        super().__init__()
        self.beats_chance, self.helped, self.unstuck = beats_chance, helped, list(unstuck)
        self.longer_frees = longer_frees
        self.adapter.augmentation = object()
        self.adapter.unaugmented_train_items = lambda: ["plain"] * 4
        self.adapter.fault_fix = lambda text: f"debugging.fault=null  # {text}"
        self.task = runs.Task(None, None, ["turned"] * 4, [])
        self.trained_on = {}

    def train(self, name, task, **kwargs):
        self.trained_on[name] = task.train_items
        return super().train(name, task)

    def chance_level(self):
        return run(8.0, 8.0)

    def learned(self, run, control):
        gain = 0.22 if self.beats_chance else 0.01
        return {
            "learned": self.beats_chance,
            "gain_vs_control": gain,
            "p_value": 1e-4 if self.beats_chance else 0.4,
        }

    def longer(self):
        return self.task, self.train("longer", self.task)

    def fix_effect(self, ref, fixed):
        if fixed is self.runs.get("longer"):
            return {"helped": True, "unstuck": self.unstuck if self.longer_frees else [], "metric": "loss",
                    "p_value": 1e-4, "gain": 0.1, "val_loss_after": fixed.val_loss}  # fmt: skip
        return {"helped": self.helped, "unstuck": self.unstuck if self.helped else [], "metric": "loss",
                "p_value": 1e-4 if self.helped else 0.5, "gain": 0.25 if self.helped else 0.0,
                "val_loss_after": fixed.val_loss}  # fmt: skip


def augmentation_context(lab):
    screen = SimpleNamespace(present=lambda *names: "plateau" in names, base=run(7.9, 7.9), checks={})
    return engine.Context(lab, screen, ref=SimpleNamespace(base=screen.base))


@pytest.mark.parametrize(
    "beats_chance, helped, unstuck, longer_frees, present",
    [
        (False, True, (), False, True),  # at chance with it, learns without it on two seeds: the label update
        (True, True, (), False, False),  # learns with it, faster without: an augmentation that slows learning
        (False, False, (), False, False),  # no better without it: not the augmentation
        (True, True, ("rot",), False, True),  # a part that stayed at the control's level learns without it
        # ... and learns with it too when trained longer: slowed, not blocked (a healthy run's translation)
        (True, True, ("trans",), True, False),
        (False, True, ("trans",), True, True),  # at chance with it: the longer run does not excuse that
    ],
)
def test_an_augmentation_is_the_cause_only_when_the_run_with_it_learns_nothing(
    beats_chance, helped, unstuck, longer_frees, present
):
    """The augmentation row (last in the table): a label-consistent augmentation can make a healthy run on the
    doctor's budget slower, so training without it helping is not enough; the configured run must not beat
    the chance level (or leave a part of the output at the control's level, even trained longer) while the
    run without it does."""
    lab = AugmentationLab(beats_chance, helped, unstuck, longer_frees)
    assert AUGMENTATION.cause == "implementation_bug" and AUGMENTATION in engine.rows(
        fixes.TABLE, augmentation_context(lab).screen, training_fixes=True
    )
    found = engine.run(augmentation_context(lab), [AUGMENTATION])["implementation_bug"]
    assert found["present"] is present
    assert lab.trained_on["no_augmentation"] == ["plain"] * 4  # the same items, not augmented
    assert ("no_augmentation_seed+1" in lab.runs) is helped  # a fix that helped is repeated
    assert found["evidence"]["configured_vs_chance"]["learned"] is beats_chance
    assert found["fix"].startswith("debugging.fault=null")
    assert found["evidence"]["freed_by_training_longer"] == (list(unstuck) if longer_frees else [])
    assert ("learn too: the augmentation slows" in found["summary"]) is longer_frees
    lab.adapter.augmentation = None
    assert not AUGMENTATION.applies(augmentation_context(lab))  # nothing to turn off


def test_the_augmentation_row_is_a_last_resort_and_a_present_finding_is_kept():
    """Tried only when no cause found before it is present (the knobs of the table explain a run at chance
    first: a too-low LR learns nothing with or without an augmentation); and of two rows with one cause, a
    later absent finding replaces neither a present nor an absent earlier one (whose evidence it would drop)."""
    lab = AugmentationLab(False, True)
    before = {"lr_too_low": engine.finding("lr_too_low", True, 0.3, {}, "training.lr=0.01", "")}
    assert engine.run(augmentation_context(lab), [AUGMENTATION], before) == {} and not lab.runs
    assert engine.run(
        augmentation_context(lab), [AUGMENTATION], {"lr_too_low": before["lr_too_low"] | {"present": False}}
    )
    found_first = dataclasses.replace(AUGMENTATION, last_resort=False, confirm=lambda *a: True)
    absent_next = dataclasses.replace(AUGMENTATION, last_resort=False, confirm=lambda *a: False)
    found = engine.run(augmentation_context(AugmentationLab(False, True)), [found_first, absent_next])
    assert found["implementation_bug"]["present"]
    found = engine.run(augmentation_context(AugmentationLab(False, True)), [absent_next, found_first])
    assert found["implementation_bug"]["present"]
    first = dataclasses.replace(absent_next, explain=lambda ctx, v, effect: ("the first row's", {}))
    found = engine.run(augmentation_context(AugmentationLab(False, True)), [first, absent_next])
    assert found["implementation_bug"]["summary"] == "the first row's"  # its evidence stays in the report


def bottleneck_net(hidden, outputs=(4, 5)):
    """Flatten -> Linear(48, hidden) -> tanh (no unit dead on every sample) -> two linear heads (`outputs`
    components each) in a dict."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, hidden), torch.nn.Tanh())
            self.rot, self.trans = (torch.nn.Linear(hidden, k) for k in outputs)

        def forward(self, x):
            h = self.body(x)
            return {"rot": self.rot(h), "trans": self.trans(h)}

    return Net()


def span_screen(span, *symptoms, at_init=None):
    names = ("no_learning", "plateau", "loss_bounces", "forgetting", "suspiciously_good")
    return SimpleNamespace(
        checks={"output_span": span, "output_span_at_init": at_init or span},
        symptoms={n: {"present": n in symptoms} for n in names},
        present=lambda *which: any(w in symptoms for w in which),
    )  # fmt: skip


def test_a_layer_narrower_than_the_output_caps_its_span_and_is_blamed_on_the_architecture():
    """Nine linear outputs of a 4-unit layer span 4 dimensions on 64 samples, of a 16-unit layer all 9; an
    output held flat (a clamp) is left out rather than counted as a missing dimension. A model that does not
    learn or plateaus with such a span, at initialization too, is `architecture`, with the hidden width the
    outputs need as the fix; a run without those symptoms is not accused, nor is a net whose span is full,
    nor one that spanned every dimension before training (its units died in training: a noisy batch or a
    high LR, not a narrow layer)."""
    batch = {"image": torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(1))}
    narrow = probes.output_span(bottleneck_net(4), batch)
    assert (narrow["n_components"], narrow["varying"], narrow["span"], narrow["n_samples"]) == (9, 9, 4, 64)
    assert narrow["relative_singular_values"][3] > 1e-3 > 1e-5 > narrow["relative_singular_values"][4]
    assert probes.output_span(bottleneck_net(16), batch)["span"] == 9
    flat = bottleneck_net(16)
    with torch.no_grad():
        flat.trans.weight[2:] = 0.0  # three translation outputs constant over the batch
    held = probes.output_span(flat, batch)
    assert (held["varying"], held["span"]) == (6, 6)

    lab = SimpleNamespace(cfg=OmegaConf.create({"model": {"hidden": 4}}))
    found = causes.output_bottleneck(lab, span_screen(narrow, "plateau"))["architecture"]
    assert found["present"] and found["strength"] == pytest.approx(1 - 4 / 9)
    assert found["fix"] == "model.hidden=16"
    assert "9 output components span only 4 dimensions" in found["summary"]
    assert causes.output_bottleneck(lab, span_screen(narrow, "no_learning"))["architecture"]["present"]
    assert causes.output_bottleneck(lab, span_screen(narrow)) == {}  # a run that learns fine
    assert causes.output_bottleneck(lab, span_screen(narrow, "loss_bounces")) == {}
    assert causes.output_bottleneck(lab, span_screen(held, "plateau")) == {}
    wide = probes.output_span(bottleneck_net(16), batch)
    assert causes.output_bottleneck(lab, span_screen(narrow, "plateau", at_init=wide)) == {}  # units died
    assert "before training the same network's outputs spanned 4" in found["summary"]
    few = dict(narrow, n_samples=9)  # 9 samples cannot show 9 dimensions
    assert causes.output_bottleneck(lab, span_screen(few, "plateau")) == {}
    unknown = SimpleNamespace(cfg=OmegaConf.create({}))
    text = causes.output_bottleneck(unknown, span_screen(narrow, "plateau"))["architecture"]["fix"]
    assert text == "widen the layers before the output to at least 9 units"


def test_a_cause_found_present_keeps_its_finding_when_a_later_check_finds_it_absent():
    """The output span finds `architecture` before the fix table; the table's wider network, which may not
    help on the doctor's short budget, must not replace that finding with an absent one; a present later
    finding replaces it, and an absent one replaces an absent one."""
    present = engine.finding("architecture", True, 0.5, {"output_span": {}}, "model.hidden=16", "span")
    absent = engine.finding("architecture", False, 0.0, {"wider_fix": {}}, "model.width=64", "wider")
    wider = engine.finding("architecture", True, 0.2, {"wider_fix": {}}, "model.width=64", "wider helped")
    other = engine.finding("lr_too_low", False, 0.0, {}, "training.lr=0.01", "")
    assert doctor.merge({"architecture": present}, {"architecture": absent, "lr_too_low": other}) == {
        "architecture": present, "lr_too_low": other,
    }  # fmt: skip
    assert doctor.merge({"architecture": present}, {"architecture": wider})["architecture"] is wider
    replaced = doctor.merge({"architecture": absent}, {"architecture": other | {"id": "architecture"}})
    assert replaced["architecture"]["fix"] == "training.lr=0.01"  # an absent one replaces an absent one
