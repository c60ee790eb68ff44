"""Every loss: zero at the ground truth, positive elsewhere, finite gradients, its invariances."""

import math

import pytest
import roma
import torch
from omegaconf import OmegaConf

from {{ cookiecutter.package_name }}.pose import geometry, losses

IMAGE_SIZE = (96, 128)
LOSS_CONFIGS = {
    "euler_l2": {"name": "euler_l2", "rotation": "euler", "translation": "direct"},
    "quaternion": {"name": "quaternion", "rotation": "quaternion", "translation": "centre_depth"},
    "sixd": {"name": "sixd", "rotation": "sixd", "translation": "centre_depth"},
    "point_matching": {
        "name": "point_matching",
        "rotation": "sixd",
        "translation": "centre_depth",
        "n_points": 200,
    },
}


def box_points(n=400, seed=0):
    """An asymmetric box 40 x 60 x 100 mm (surface samples)."""
    generator = torch.Generator().manual_seed(seed)
    points = (torch.rand(n, 3, generator=generator) - 0.5) * torch.tensor([40.0, 60.0, 100.0])
    face = torch.randint(0, 3, (n,), generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    half = torch.tensor([20.0, 30.0, 50.0])
    points[torch.arange(n), face] = sign * half[face]
    return points


def make_batch(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    quat = torch.randn(n, 4, generator=generator)
    R = roma.unitquat_to_rotmat(quat / quat.norm(dim=-1, keepdim=True))
    t = torch.stack(
        [
            torch.rand(n, generator=generator) * 100 - 50,
            torch.rand(n, generator=generator) * 80 - 40,
            300 + torch.rand(n, generator=generator) * 400,
        ],
        dim=-1,
    )
    K = torch.tensor([[300.0, 0, 64], [0, 300.0, 48], [0, 0, 1]]).expand(n, 3, 3).clone()
    return {"R": R, "t": t, "K": K, "image": torch.zeros(n, 3, *IMAGE_SIZE)}


def gt_output(criterion, batch):
    return {
        "rot": geometry.rotmat_to_target(batch["R"], criterion.rotation),
        "trans": geometry.encode_translation(batch["t"], batch["K"], criterion.translation, IMAGE_SIZE),
    }


def build(name, symmetric=False, points=None):
    return losses.build_criterion(
        OmegaConf.create(LOSS_CONFIGS[name]), box_points() if points is None else points, symmetric
    )


@pytest.mark.parametrize("name", losses.LOSSES)
def test_zero_at_ground_truth(name):
    criterion = build(name)
    batch = make_batch()
    loss, parts = criterion(gt_output(criterion, batch), batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert float(parts["rot_err_deg"]) < 0.1 and float(parts["trans_err_mm"]) < 1e-2
    assert set(parts) == {"loss", "rot", "trans", "rot_err_deg", "trans_err_mm"}


@pytest.mark.parametrize("name", losses.LOSSES)
def test_positive_and_finite_gradients_away_from_ground_truth(name):
    criterion = build(name)
    batch = make_batch(seed=1)
    generator = torch.Generator().manual_seed(1)
    out = {
        k: (v + 0.3 * torch.randn(v.shape, generator=generator)).requires_grad_()
        for k, v in gt_output(criterion, batch).items()
    }
    loss, parts = criterion(out, batch)
    assert loss.item() > 1e-3 and float(parts["rot"]) > 0 and float(parts["trans"]) > 0
    loss.backward()
    for value in out.values():
        assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0


@pytest.mark.parametrize("name", losses.LOSSES)
def test_gradients_finite_at_ground_truth_and_for_zero_output(name):
    criterion = build(name, symmetric=name == "point_matching")
    batch = make_batch(seed=2)
    for out in (
        gt_output(criterion, batch),
        {"rot": torch.zeros(16, geometry.rotation_dim(criterion.rotation)), "trans": torch.zeros(16, 3)},
    ):
        out = {k: v.clone().requires_grad_() for k, v in out.items()}
        loss, _ = criterion(out, batch)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v.grad).all() for v in out.values())


def test_loss_grows_with_rotation_error():
    batch = make_batch(n=1, seed=3)
    for name in ("quaternion", "sixd", "point_matching"):
        criterion = build(name)
        values = []
        for degrees in (5, 30, 90, 150):
            R_off = roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.radians(degrees)])) @ batch["R"]
            out = gt_output(criterion, batch)
            out["rot"] = geometry.rotmat_to_target(R_off, criterion.rotation)
            values.append(criterion(out, batch)[0].item())
        assert values == sorted(values), name


def test_quaternion_loss_is_sign_invariant():
    criterion = build("quaternion")
    batch = make_batch(seed=4)
    out = gt_output(criterion, batch)
    out["rot"] = out["rot"] + 0.2 * torch.randn(out["rot"].shape, generator=torch.Generator().manual_seed(4))
    flipped = {"rot": -out["rot"], "trans": out["trans"]}
    assert criterion(out, batch)[0].item() == pytest.approx(criterion(flipped, batch)[0].item(), rel=1e-6)
    assert criterion(out, batch)[0].item() > 0


def test_euler_baseline_punishes_wrap_around():
    # +179 deg vs -179 deg about z is a 2 degree error; the baseline pays for 358 degrees.
    criterion = build("euler_l2")
    R = geometry.raw_to_rotmat(torch.tensor([[0.0, 0.0, math.radians(-179.0)]]), "euler")
    batch = {"R": R, "t": torch.tensor([[0.0, 0.0, 500.0]]), "K": torch.eye(3)[None]}
    out = {"rot": torch.tensor([[0.0, 0.0, math.radians(179.0)]]), "trans": torch.tensor([[0.0, 0.0, 5.0]])}
    loss, parts = criterion(out, batch)
    assert loss.item() == pytest.approx(math.radians(358.0) ** 2, rel=1e-4)
    assert float(parts["rot_err_deg"]) == pytest.approx(2.0, abs=0.05)


def test_shape_match_is_invariant_under_the_objects_symmetry():
    # A point set closed under a 180 degree turn about z: ShapeMatch is ~0 for that turn, PLoss is not.
    flip = roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.pi]))
    half = box_points(n=100)
    points = torch.cat([half, half @ flip.T])  # 200 points = n_points, so none are subsampled away
    batch = make_batch(n=8, seed=5)
    shape_match = build("point_matching", symmetric=True, points=points)
    ploss = build("point_matching", symmetric=False, points=points)
    out = gt_output(shape_match, batch)
    out["rot"] = geometry.rotmat_to_target(batch["R"] @ flip, "sixd")
    assert shape_match(out, batch)[0].item() < 1e-6
    assert ploss(out, batch)[0].item() > 0.05
    out["rot"] = geometry.rotmat_to_target(
        batch["R"] @ roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, 0.5])), "sixd"
    )
    assert shape_match(out, batch)[0].item() > 1e-3


def test_point_matching_scale_free_in_object_size():
    batch = make_batch(n=4, seed=6)
    small, large = (
        build("point_matching", points=box_points()),
        build("point_matching", points=10 * box_points()),
    )
    out = gt_output(small, batch)
    out["rot"] = out["rot"] + 0.1
    assert small(out, batch)[0].item() == pytest.approx(large(out, batch)[0].item(), rel=1e-4)


def test_weights_scale_the_terms():
    batch = make_batch(seed=7)
    config = dict(LOSS_CONFIGS["sixd"], rotation_weight=2.0, translation_weight=0.5)
    criterion = losses.build_criterion(OmegaConf.create(config))
    out = {k: v + 0.1 for k, v in gt_output(criterion, batch).items()}
    loss, parts = criterion(out, batch)
    assert loss.item() == pytest.approx(2.0 * float(parts["rot"]) + 0.5 * float(parts["trans"]), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "symmetric"), [*((n, False) for n in losses.LOSSES), ("point_matching", True)]
)
def test_per_sample_is_the_loss_of_each_one_sample_batch(name, symmetric):
    # the doctor scores validation samples with per_sample; it must give what the criterion gives on each one
    batch = make_batch(n=6, seed=3)
    config = dict(LOSS_CONFIGS[name], rotation_weight=2.0, translation_weight=0.5)
    criterion = losses.build_criterion(OmegaConf.create(config), box_points(), symmetric)
    generator = torch.Generator().manual_seed(4)
    out = {
        k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in gt_output(criterion, batch).items()
    }
    values, parts = criterion.per_sample(out, batch)
    for i in range(len(values)):
        one = criterion(
            {k: v[i : i + 1] for k, v in out.items()}, {k: v[i : i + 1] for k, v in batch.items()}
        )
        assert values[i].item() == pytest.approx(one[0].item(), rel=1e-5)
        for term, value in one[1].items():
            assert parts[term][i].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), term
    assert values.mean().item() == pytest.approx(criterion(out, batch)[0].item(), rel=1e-5)


def test_shipped_configs_build(tmp_path):
    from pathlib import Path

    config_dir = Path(__file__).resolve().parents[2] / "configs" / "loss"
    names = sorted(p.stem for p in config_dir.glob("*.yaml"))
    assert names == sorted(losses.LOSSES)
    for path in config_dir.glob("*.yaml"):
        criterion = losses.build_criterion(OmegaConf.load(path), box_points(), symmetric=False)
        assert criterion.name == path.stem


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="loss.name='l1'"):
        losses.build_criterion(OmegaConf.create({"name": "l1", "rotation": "sixd", "translation": "direct"}))
    with pytest.raises(ValueError, match="needs loss.rotation=euler"):
        losses.build_criterion(
            OmegaConf.create({"name": "euler_l2", "rotation": "sixd", "translation": "direct"})
        )
    with pytest.raises(ValueError, match="model points"):
        losses.build_criterion(OmegaConf.create(LOSS_CONFIGS["point_matching"]))
    with pytest.raises(ValueError, match="translation mode 'xyz'"):
        losses.build_criterion(OmegaConf.create({"name": "sixd", "rotation": "sixd", "translation": "xyz"}))
