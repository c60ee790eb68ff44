"""The failure-mode probes, the doctor's training runs and its statistics on small generic problems (no pose
code involved): each probe must flag its failure and stay quiet on a healthy case."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from {{ cookiecutter.package_name }} import training
from {{ cookiecutter.package_name }}.batches import collate
from {{ cookiecutter.package_name }}.debugging import leaks, probes, runs, stats
from {{ cookiecutter.package_name }}.debugging.lab import Lab, Reference

torch.set_num_threads(1)


def regression_items(n=320, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 2, generator=g)
    y = x @ w + noise * torch.randn(n, 2, generator=g)
    return [(x[i], y[i]) for i in range(n)]


def mse(out, batch):
    return nn.functional.mse_loss(out, batch[1])


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


class IgnoresInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(torch.zeros_like(x))


class ViewBug(nn.Module):
    """Mixes samples: the batch is reshaped as if features came first (the classic .view bug)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        b, f = x.shape
        return self.net(x.reshape(f, b).t().reshape(b, f) if b != f else x)


def make_task(items=None, model_factory=mlp, **kw):
    items = items or regression_items()
    return runs.Task(model_factory, mse, items[:256], items[256:], lr=1e-2, epochs=4, input_key=0, **kw)


@pytest.fixture(scope="module")
def healthy_runs():
    task = make_task()
    return task, runs.train(task), runs.train(task, items=lambda it: runs.zero_inputs(it, 0))


def test_healthy_regression_learns(healthy_runs):
    task, run, control = healthy_runs
    result = stats.learning_vs_control(run, control)
    assert result["learned"] and result["gain_vs_control"] > 0.5
    assert run.val_curve[-1] < run.val_curve[0]
    assert stats.bounce_statistics(run)["train_rises"] == 0
    assert stats.forgetting_statistics(run)["ratio"] < 1.5


def test_the_doctors_runs_take_the_projects_training_step(monkeypatch):
    """runs.train and the training probes step through training.train_step (what `make train` runs), looked
    up at call time: every step they take is one of its calls."""
    calls = []
    real = training.train_step

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", counted)
    run = runs.train(make_task().replace(epochs=1))
    assert len(calls) == len(run.step_losses) == 8  # 256 items, batch 32
    probes.overfit_subset(make_task(), steps=5)
    lr = probes.lr_range_test(make_task(), steps=7)
    assert len(calls) == 8 + 5 + len(lr["lrs"])


class MseWithPerSample:
    """mse with named parts and a per_sample method; `scale` != 1 makes per_sample disagree with the loss."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, out, batch):
        err = ((out - batch[1]) ** 2).mean(1)
        return err.mean(), {"first": ((out[:, 0] - batch[1][:, 0]) ** 2).mean()}

    def per_sample(self, out, batch):
        return self.scale * ((out - batch[1]) ** 2).mean(1), {"first": (out[:, 0] - batch[1][:, 0]) ** 2}


def test_a_criterions_per_sample_gives_the_one_sample_loop_values_and_a_wrong_one_is_named():
    task = make_task(items=regression_items(n=400))
    model = task.model_factory()
    criterion = MseWithPerSample()
    slow_parts, fast_parts = {}, {}
    slow = runs.per_sample_losses(
        task.replace(criterion=lambda o, b: criterion(o, b)), model, task.val_items, parts=slow_parts
    )
    fast = runs.per_sample_losses(task.replace(criterion=criterion), model, task.val_items, parts=fast_parts)
    assert len(fast) == len(task.val_items) == 144
    np.testing.assert_allclose(fast, slow, rtol=1e-5)
    np.testing.assert_allclose(fast_parts["first"], slow_parts["first"], rtol=1e-5)
    with pytest.raises(ValueError, match="criterion.per_sample"):
        runs.per_sample_losses(task.replace(criterion=MseWithPerSample(scale=2.0)), model, task.val_items)


def test_input_independent_model_is_flagged(healthy_runs):
    task, _, control = healthy_runs
    lazy = make_task(model_factory=IgnoresInput)
    run = runs.train(lazy)
    assert not stats.learning_vs_control(run, control)["learned"]
    dep = probes.batch_dependency(IgnoresInput(), collate(lazy.train_items[:8]), input_key=0)
    assert dep["own_gradient"] == 0.0
    assert not probes.overfit_subset(lazy)["passed"]
    assert probes.overfit_subset(task)["passed"]


def test_backprop_dependency_flags_batch_mixing():
    batch = collate(regression_items()[:16])
    assert probes.batch_dependency(mlp(), batch, input_key=0)["ratio"] == 0.0
    assert probes.batch_dependency(ViewBug(), batch, input_key=0)["ratio"] > 1e-3
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    assert probes.batch_dependency(bn, batch, input_key=0)["ratio"] == 0.0  # eval mode: running stats
    assert probes.batch_dependency(bn, batch, input_key=0, train_mode=True)["ratio"] > 1e-3


def test_lr_range_test_suggests_a_sane_lr():
    lr = probes.lr_range_test(make_task(), steps=80)
    # Adam on a small MLP regression trains well between 1e-3 and 1e-1
    assert 1e-4 <= lr["suggestion"] <= 0.3, lr["suggestion"]
    assert lr["lr_valley"] == pytest.approx(10 * lr["suggestion"])
    assert lr["losses"][int(np.argmin(lr["losses"]))] < lr["losses"][0]


def test_order_probe_flags_sorted_targets():
    items = regression_items()[:256]
    shuffled = probes.order_test(make_task(items=items + items[:64]))
    assert shuffled["p_value"] > 1e-3
    ordered = sorted(items, key=lambda it: float(it[1][0]))
    blocked = probes.order_test(make_task(items=ordered + ordered[:64], shuffle=False))
    assert blocked["p_value"] < 1e-6 and blocked["lag1_autocorrelation"] > 0.5


def test_shuffled_targets_are_not_learnable():
    items = runs.permute_inputs(regression_items(), seed=1, input_key=0)
    task = make_task(items=items)
    run = runs.train(task)
    control = runs.train(task, items=lambda it: runs.zero_inputs(it, 0))
    assert not stats.learning_vs_control(run, control)["learned"]
    assert probes.overfit_subset(task)["passed"]  # memorizing a handful still works: not a code bug


def test_duplicates_across_splits_are_found():
    items = regression_items()
    found = leaks.duplicates({"train": items[:200], "val": items[190:240]}, input_key=0)
    assert found["train/val"]["shared"] == 10
    assert leaks.duplicate_fraction(found) == pytest.approx(10 / 50)  # of the validation split's 50
    three = leaks.duplicates(
        {"train": items[:200], "val": items[190:240], "test": items[195:200]}, input_key=0
    )
    assert leaks.duplicate_fraction(three) == 1.0  # every test input is a training input
    assert (
        leaks.duplicates({"train": items[:200], "val": items[200:]}, input_key=0)["train/val"]["shared"] == 0
    )


def test_shortcut_probe_finds_a_leaked_pixel():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(300, 1, 8, 8, generator=g)
    targets = torch.rand(300, 1, generator=g)
    clean = [{"image": images[i], "target": targets[i]} for i in range(300)]
    leaked = [
        {"image": torch.cat([images[i].flatten()[:-1], targets[i]]).reshape(1, 8, 8), "target": targets[i]}
        for i in range(300)
    ]
    task = runs.Task(None, None, clean[:200], clean[200:])
    assert leaks.shortcut_probe(task)["best_single_value_r2"] < 0.2
    found = leaks.shortcut_probe(task.replace(train_items=leaked[:200], val_items=leaked[200:]))
    assert found["best_single_value_r2"] > 0.99 and found["best_single_value_index"] == 63


def test_ridge_leave_one_out_matches_refitting_without_each_sample():
    """The closed form (one SVD, leverages) against the definition: refit without sample i, predict it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = np.c_[x[:, :3] @ [1.0, -2.0, 0.5] + rng.normal(0, 0.5, 40), rng.normal(size=40)]
    penalties = [0.1, 3.0, 100.0]
    # standardization and centring as the closed form does them: on all 40 samples
    a = (x - x.mean(0)) / x.std(0)
    yc = y - y.mean(0)
    best = np.full(2, np.inf)
    for penalty in penalties:
        errors = np.zeros((40, 2))
        for i in range(40):
            keep = np.arange(40) != i
            # the intercept refitted without sample i, unpenalized: centre the 39 samples' columns
            am, ym = a[keep].mean(0), yc[keep].mean(0)
            w = np.linalg.solve(
                (a[keep] - am).T @ (a[keep] - am) + penalty * np.eye(12), (a[keep] - am).T @ (yc[keep] - ym)
            )
            errors[i] = yc[i] - ((a[i] - am) @ w + ym)
        best = np.minimum(best, (errors**2).sum(0))
    expected = 1 - best / ((y - y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(leaks._ridge_loo_r2(x, y, penalties), expected, rtol=1e-6)
    assert expected[0] > 0.8 and expected[1] < 0.1


def test_shortcut_probe_discounts_what_chance_explains_on_few_samples():
    """16 samples of noise: the best of 768 one-value fits explains much of an unrelated target by chance,
    and so do thumbnails; reported above chance, nothing is left. A pixel that is the target still is."""
    g = torch.Generator().manual_seed(0)
    images, targets = torch.rand(20, 3, 16, 16, generator=g), torch.rand(20, 1, generator=g)
    found = probe_split(images, targets, 16)
    assert found["best_single_value_chance_r2"] > 0.4, found
    assert found["best_single_value_r2"] < 0.3 and found["trivial_model_r2"] < 0.3, found
    images[:, 0, 5, 5] = targets[:, 0]
    found = probe_split(images, targets, 16)
    assert found["best_single_value_r2"] > 0.99 and found["best_single_value_index"] == 5 * 16 + 5


def probe_split(images, targets, n_train):
    items = [{"image": images[i], "target": targets[i]} for i in range(len(images))]
    return leaks.shortcut_probe(runs.Task(None, None, items[:n_train], items[n_train:]))


def shapes(n=400, seed=0):
    """16x16 images of noise with a bright 4x4 square at a random place; the target is unrelated to them."""
    g = torch.Generator().manual_seed(seed)
    images = 0.5 * torch.rand(n, 1, 16, 16, generator=g)
    for i, (r, c) in enumerate(torch.randint(0, 12, (n, 2), generator=g).tolist()):
        images[i, :, r : r + 4, c : c + 4] += 0.5
    return images, torch.rand(n, 1, generator=g)


def probe(images, targets):
    return probe_split(images, targets, 300)


@pytest.mark.parametrize("leak", ["brightness", "noisy_block"])
def test_shortcut_probe_finds_a_leak_no_single_pixel_shows(leak):
    """Two leaks the one-pixel fit misses (best pixel R^2 < 0.9): the target as every image's brightness
    (a gain on the whole image), and the target written into a 4x4 block under heavy noise (each pixel
    alone R^2 ~ 0.6). A thumbnail or the global statistics expose both; standardizing each image removes
    the brightness leak, not the block."""
    images, targets = shapes()
    assert probe(images, targets)["trivial_model_r2"] < 0.2  # content unrelated to the target: nothing found
    g = torch.Generator().manual_seed(1)
    if leak == "brightness":
        leaked = images * (0.5 + targets[:, :, None, None])
    else:
        leaked = images.clone()
        leaked[:, :, 8:12, 8:12] = targets[:, :, None, None] + 0.25 * torch.randn(
            len(images), 1, 4, 4, generator=g
        )
    found = probe(leaked, targets)
    assert found["best_single_value_r2"] < 0.9 and found["trivial_model_r2"] >= 0.9, found
    after = found["trivial_model_r2_per_image_standardized"]
    assert after < 0.9 if leak == "brightness" else after >= 0.9, found


def test_statistics_behave():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.1, 200)
    assert stats.paired_test(a + 0.2, a)[0] < 0.01
    assert stats.paired_test(a, a + 0.2)[0] > 0.5
    assert stats.trend_test(np.arange(10, 0, -1.0))[1] < 0.01
    assert stats.trend_test(rng.normal(size=10), seed=1)[1] > 0.01
    assert stats.runs_test(np.sort(rng.normal(size=100)))[1] < 1e-6
    small = probes.test_set_precision(a, n_total=12)
    big = probes.test_set_precision(a, n_total=2000)
    assert small["ci95_half_width"] > 10 * big["ci95_half_width"] / 2


def test_two_sample_test_against_every_split():
    """The permutation p-value of mean(a) > mean(b) against the exact one: the share of all C(10, 4) ways to
    pick a's 4 values from the pooled 10 whose mean difference is at least the observed one."""
    import itertools

    a, b = np.array([3.0, 4.5, 2.2, 5.1]), np.array([1.0, 2.5, 3.3, 0.7, 2.0, 1.9])
    pooled = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    splits = [
        pooled[list(i)].mean() - np.delete(pooled, list(i)).mean()
        for i in itertools.combinations(range(10), 4)
    ]
    exact = np.mean(np.asarray(splits) >= observed - 1e-12)
    p, ratio = stats.two_sample_test(a, b, n_perm=20000)
    assert abs(p - exact) < 0.006 and exact < 0.05, (p, exact)
    assert ratio == pytest.approx(a.mean() / b.mean())
    assert stats.two_sample_test(b, a)[0] > 0.9
    rng = np.random.default_rng(1)
    null = [
        stats.two_sample_test(rng.gamma(4, 1, 300), rng.gamma(4, 1, 50), n_perm=500, seed=s)[0]
        for s in range(200)
    ]
    assert np.mean(np.asarray(null) < 0.05) <= 0.1  # calibrated: about 5 % of same-distribution pairs


def test_runs_test_on_a_class_indicator():
    """A 0/1 target (one class of a classifier) is mostly ties at its median: shuffled it is not "in blocks",
    sorted it is."""
    shuffled = [(np.random.default_rng(seed).random(400) < 0.3).astype(float) for seed in range(100)]
    p_values = np.array([stats.runs_test(labels)[1] for labels in shuffled])
    assert (p_values < 0.01).mean() <= 0.05  # calibrated: about 1 % of shuffled sequences below 0.01
    z, p = stats.runs_test(np.sort(shuffled[0]))
    assert z < -10 and p < 1e-6, (z, p)


def test_a_tiny_batch_run_keeps_its_minimum_epochs_within_the_step_budget():
    """Sized in epochs and steps: batch 2 over 256 items is 128 steps an epoch; with 40 steps and 4 epochs
    at least, each epoch takes 10 steps (20 items), so the loss is seen from epoch to epoch. (Batch 2 of
    (x, y) tuples also checks that a collated pair is not mistaken for a list of two samples.)"""
    task = make_task(batch_size=2, max_steps=40, min_epochs=4)
    run = runs.train(task)
    assert [len(e) for e in run.epoch_step_losses] == [10, 10, 10, 10]
    one = runs.train(task.replace(min_epochs=1))
    assert [len(e) for e in one.epoch_step_losses] == [40]  # one epoch, cut to the step budget too
    roomy = runs.train(make_task(batch_size=32, max_steps=40, min_epochs=4))
    assert [len(e) for e in roomy.epoch_step_losses] == [8, 8, 8, 8]  # fits: the items are not cut


def two_target_items(n=320, seed=0):
    """y[:, 0] and y[:, 1] both depend on x: a model that sees x for both can learn both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 2, generator=g) + 0.1 * torch.randn(n, 2, generator=g)
    return [(x[i], y[i]) for i in range(n)]


def two_terms(out, batch):
    a = nn.functional.mse_loss(out[:, 0], batch[1][:, 0])
    b = nn.functional.mse_loss(out[:, 1], batch[1][:, 1])
    return a + b, {"a": a.detach(), "b": b.detach()}


class HalfBlind(nn.Module):
    """Output 0 from the input, output 1 a learned constant: term b cannot go above the control's level."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.constant = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.cat([self.net(x), self.constant.expand(len(x), 1)], dim=1)


def test_a_term_that_does_not_learn_is_named_and_a_fix_that_unsticks_it_helps():
    items = two_target_items()
    task = runs.Task(mlp, two_terms, items[:256], items[256:], lr=1e-2, epochs=4, input_key=0)
    control = runs.train(task, items=lambda it: runs.zero_inputs(it, 0))
    healthy = stats.learning_vs_control(runs.train(task), control)
    assert healthy["learned"] and stats.terms_not_learning(healthy) == []
    blind = runs.train(task.replace(model_factory=HalfBlind))
    learning = stats.learning_vs_control(blind, control)
    assert learning["learned"]  # the total loss falls: term a learns
    assert stats.terms_not_learning(learning) == ["b"]
    lab = object.__new__(Lab)
    lab.th = SimpleNamespace(alpha=0.01, min_learning_gain=0.05, min_fix_gain=0.05)
    effect = lab.fix_effect(Reference(blind, control=control, stuck=("b",)), runs.train(task))
    assert effect["unstuck"] == ["b"] and effect["helped"]
    same = lab.fix_effect(
        Reference(blind, control=control, stuck=("b",)),
        runs.train(task.replace(model_factory=HalfBlind, seed=1)),
    )
    assert same["unstuck"] == [] and not same["helped"]


@pytest.mark.parametrize("batch, chance_batch", [(2, 32), (64, 64)])
def test_the_chance_level_trains_at_the_reference_batch_at_least(batch, chance_batch):
    """The converged chance level is a neutral recipe: a tiny configured batch (the batch_too_small fault) must
    not keep it from converging, or a model that learns nothing looks better than "random"."""
    lab = object.__new__(Lab)
    lab.task = make_task(batch_size=batch, max_steps=40)
    lab.d = SimpleNamespace(longer_epochs=16, reference_batch_size=32, verbose=False)
    lab.chance, lab.runs, lab.log = None, {}, []
    chance = lab.chance_level()
    assert lab.runs["chance_level"] is chance and np.isfinite(chance.val_loss)
    # whole epochs of 256 items at the chance batch (at batch 2 it would be one epoch cut to the 40 steps)
    assert {len(e) for e in chance.epoch_step_losses} == {256 // chance_batch}, chance.epoch_step_losses


def keypoint_batch(n=32, size=16, seed=0):
    """A keypoint task that is not pose: each image a bright blob, its label the blob's (x, y) in pixels."""
    g = torch.Generator().manual_seed(seed)
    xy = 3 + torch.rand(n, 2, generator=g) * (size - 7)
    return {"image": draw_points(xy, size), "xy": xy}


def draw_points(xy, size=16):
    grid = torch.arange(size, dtype=torch.float32)
    wx = torch.exp(-((grid - xy[:, :1]) ** 2) / 2)  # [B, W]
    wy = torch.exp(-((grid - xy[:, 1:]) ** 2) / 2)  # [B, H]
    return (wy[:, :, None] * wx[:, None, :])[:, None].expand(-1, 3, -1, -1)


def random_flip(batch, forget_label=False):
    """Flip each image left-right with probability 1/2 (torch's global generator); x -> W - 1 - x with it."""
    flip = torch.rand(len(batch["xy"])) < 0.5
    image = torch.where(flip[:, None, None, None], batch["image"].flip(-1), batch["image"])
    x = torch.where(flip, batch["image"].shape[-1] - 1 - batch["xy"][:, 0], batch["xy"][:, 0])
    return batch | {
        "image": image,
        "xy": batch["xy"] if forget_label else torch.stack([x, batch["xy"][:, 1]], 1),
    }


def test_augmentation_agreement_finds_a_label_update_that_disagrees_with_the_image():
    """The augmentation check on a task that is not pose: a flip that mirrors the keypoint with the image agrees
    on every sample; one that forgets the label disagrees on the flipped half. Generators are left untouched."""
    batch = keypoint_batch()
    draw = lambda b: draw_points(b["xy"])  # noqa: E731
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    right = probes.augmentation_agreement(draw, random_flip, batch)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(
        np.random.get_state()[1], before[1]
    )
    assert right["n_samples"] == 32 and right["correlation_min"] > 0.999
    wrong = probes.augmentation_agreement(draw, lambda b: random_flip(b, forget_label=True), batch)
    low = np.array(wrong["correlations"]) < 0.9
    assert 0.25 < low.mean() < 0.75  # the flipped samples, about half
    assert wrong == probes.augmentation_agreement(draw, lambda b: random_flip(b, forget_label=True), batch)
    assert probes.augmentation_agreement(lambda b: None, random_flip, batch) is None  # the task draws nothing


def random_shift(batch, forget_label=False, most=6):
    """Shift each image sideways by a random whole number of pixels in [-most, most] (torch's global
    generator), the columns it brings in black; x moves with it."""
    shifts = torch.randint(-most, most + 1, (len(batch["xy"]),))
    image = torch.zeros_like(batch["image"])
    width = image.shape[-1]
    for i, s in enumerate(shifts.tolist()):
        image[i, ..., max(s, 0) : width + min(s, 0)] = batch["image"][i, ..., max(-s, 0) : width - max(s, 0)]
    xy = batch["xy"] if forget_label else batch["xy"] + torch.stack([shifts, 0 * shifts], 1)
    return batch | {"image": image, "xy": xy}


def test_augmentation_agreement_compares_only_what_the_frame_held():
    """Keypoints near and over the frame's edges: their blobs are cut by the frame, and a shift brings in the
    part the stored image never held, black in the shifted drawing, drawn in full from the shifted label.
    That is no disagreement: a right shift agrees on every sample (only pixels whose source lies inside the
    frame are compared), a shift that forgets the label still disagrees, and samples drawn wholly off the
    frame on both sides are left out."""
    g = torch.Generator().manual_seed(1)
    xy = torch.stack([torch.rand(40, generator=g) * 22 - 3, 3 + torch.rand(40, generator=g) * 9], 1)
    xy[:2, 0] = -60.0  # far off the frame: nothing of either drawing lies inside it
    batch = {"image": draw_points(xy), "xy": xy}
    draw = lambda b: draw_points(b["xy"])  # noqa: E731
    right = probes.augmentation_agreement(draw, random_shift, batch)
    assert right["n_drawn_off_frame"] >= 2 and right["n_samples"] + right["n_drawn_off_frame"] == 40
    assert right["correlation_min"] > 0.999, right["correlations"]
    assert 0.6 < right["inside_share_median"] < 1.0
    wrong = probes.augmentation_agreement(draw, lambda b: random_shift(b, forget_label=True), batch)
    assert (np.array(wrong["correlations"]) < 0.9).mean() > 0.5
