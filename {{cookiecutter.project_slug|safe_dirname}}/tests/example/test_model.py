import math

import pytest
import roma
import torch
import torchvision
from omegaconf import OmegaConf

from conftest import compose
from {{ cookiecutter.package_name }}.pose import geometry, losses
from {{ cookiecutter.package_name }}.pose.model import PoseEstimator, build_model, initialize
from {{ cookiecutter.package_name }}.pose.task import PoseTask

K64 = torch.tensor([[80.0, 0.0, 31.5], [0.0, 80.0, 31.5], [0.0, 0.0, 1.0]])


def small(*overrides):
    return compose("model.width=8", "model.hidden=32", *overrides)


def assert_rotations(R):
    eye = torch.eye(3).expand(len(R), 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(len(R)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["euler_l2", "quaternion", "sixd", "point_matching"])
def test_output_shapes_and_decode_per_representation(loss):
    cfg = small(f"loss={loss}")
    net = build_model(cfg).eval()
    images = torch.rand(3, 3, 64, 64)
    out = net(images)
    assert out["rot"].shape == (3, geometry.rotation_dim(losses.rotation_of(cfg.loss)))
    assert out["trans"].shape == (3, 3)
    R, t = net.decode(out, K64.expand(3, 3, 3))
    assert_rotations(R)
    # decode is exactly the geometry module's decoding of the raw outputs
    expected = geometry.decode_translation(out["trans"], K64.expand(3, 3, 3), cfg.loss.translation, 64)
    torch.testing.assert_close(t, expected)


def test_pose_estimator_returns_valid_poses_in_front_of_the_camera():
    net = build_model(small())
    R, t = PoseEstimator(net).eval()(torch.rand(4, 3, 64, 64), K64.expand(4, 3, 3))
    assert R.shape == (4, 3, 3) and t.shape == (4, 3)
    assert_rotations(R)
    assert (t[:, 2] > 0).all()  # centre_depth decodes depth through exp: always in front


class DotReader(torch.nn.Module):
    """A stand-in network that reads the pose off the image: channel 0 holds a dot at the object origin's
    projection, channel 1 one at its x axis' tip; depth is DEPTH_MM. Its answer turns with the image."""

    def forward(self, images):
        H, W = images.shape[-2:]
        v, u = torch.meshgrid(
            torch.arange(H, dtype=images.dtype), torch.arange(W, dtype=images.dtype), indexing="ij"
        )
        mass = images[:, :2].sum((2, 3))
        centres = (
            torch.stack([(images[:, :2] * u).sum((2, 3)), (images[:, :2] * v).sum((2, 3))], -1)
            / mass[..., None]
        )
        axis = centres[:, 1] - centres[:, 0]
        R = roma.rotvec_to_rotmat(
            torch.atan2(axis[:, 1], axis[:, 0])[:, None] * torch.tensor([0.0, 0.0, 1.0])
        )
        uv = centres[:, 0]
        trans = torch.stack(
            [
                2 * uv[:, 0] / W - 1,
                2 * uv[:, 1] / H - 1,
                torch.full_like(uv[:, 0], math.log(DEPTH_MM / 1000)),
            ],
            -1,
        )
        return {"rot": geometry.rotmat_to_target(R, "sixd"), "trans": trans}

    def decode(self, out, K, image_size):
        return geometry.raw_to_rotmat(out["rot"], "sixd"), geometry.decode_translation(
            out["trans"], K, "centre_depth", image_size
        )


DEPTH_MM = 250.0


def dot_images(R, t, K, size=64, sigma=1.2):
    """Gaussian dots at the projections of the object origin (channel 0) and of (25, 0, 0) mm (channel 1)."""
    points = torch.tensor([[0.0, 0.0, 0.0], [25.0, 0.0, 0.0]])
    uv = geometry.project(points.expand(len(R), 2, 3), R, t, K)  # [B,2,2]
    v, u = torch.meshgrid(torch.arange(size, dtype=R.dtype), torch.arange(size, dtype=R.dtype), indexing="ij")
    d2 = (u - uv[..., 0, None, None]) ** 2 + (v - uv[..., 1, None, None]) ** 2  # [B,2,H,W]
    dots = torch.exp(-d2 / (2 * sigma**2))
    return torch.cat([dots, torch.zeros_like(dots[:, :1])], 1)


@pytest.mark.parametrize("views", [1, 4, 8])
def test_test_time_views_turn_each_answer_back(views):
    """Each turned view's pose is turned back before the average: an estimator that reads the pose off the
    image gets the true pose from every view (a view turned the wrong way would be off by twice its angle)."""
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(5, generator=g) * 2 - 1) * math.pi
    R = roma.rotvec_to_rotmat(angles[:, None] * torch.tensor([0.0, 0.0, 1.0]))
    t = torch.cat([(torch.rand(5, 2, generator=g) * 2 - 1) * 30, torch.full((5, 1), DEPTH_MM)], -1)
    K = K64.expand(5, 3, 3)
    R_est, t_est = PoseEstimator(DotReader(), views)(dot_images(R, t, K), K)
    assert_rotations(R_est)
    assert geometry.geodesic_angle_deg(R_est, R).max() < 1.0
    torch.testing.assert_close(t_est, t, atol=0.3, rtol=0)


def test_the_estimator_takes_its_views_from_the_trained_config():
    cfg = small("model.test_views=3")
    assert PoseTask(cfg).inference_model(build_model(cfg), cfg).views == 3
    old = small()
    OmegaConf.set_struct(old, False)
    del old.model["test_views"]  # a checkpoint from before test-time views: one view
    assert PoseTask(old).inference_model(build_model(old), old).views == 1
    with pytest.raises(ValueError, match="model.test_views must be >= 1"):
        PoseEstimator(build_model(cfg), 0)


def test_the_network_normalizes_its_input():
    cfg = small()
    net = build_model(cfg).eval()
    raw = build_model(small("model.normalize_input=false")).eval()
    raw.load_state_dict(net.state_dict())
    images = torch.rand(2, 3, 64, 64)
    normalized = (images - net.mean) / net.std
    torch.testing.assert_close(net(images)["rot"], raw(normalized)["rot"])


def fans(weight):
    receptive = weight[0, 0].numel()  # kernel height x width for a conv, 1 for a linear layer
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@pytest.mark.parametrize("init", ["he_normal", "xavier_uniform", "small_normal", "zeros", "default"])
def test_inits_draw_from_their_distributions(init):
    # Each init is told apart by its scale (std against the fan-in / fan-out formula) and its shape:
    # a uniform draw stays inside its bound (max / std = sqrt(3)), a normal one of >= 1000 draws does not.
    net = build_model(small(f"model.init={init}", "model.init_std=0.01"))
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    checked = 0
    for layer in layers:
        w = layer.weight.detach()
        if init != "default" and layer.bias is not None:
            assert not layer.bias.any()
        if init == "zeros":
            assert not w.any()
            continue
        if w.numel() < 1000:  # too few draws for the statistics below
            continue
        checked += 1
        fan_in, fan_out = fans(w)
        std, peak = w.std().item(), w.abs().max().item()
        if init in ("xavier_uniform", "default"):
            # xavier: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); PyTorch's default: a = 1 / sqrt(fan_in)
            bound = math.sqrt(6 / (fan_in + fan_out)) if init == "xavier_uniform" else 1 / math.sqrt(fan_in)
            assert peak <= bound and peak > 0.95 * bound, (layer, peak, bound)
            assert std == pytest.approx(bound / math.sqrt(3), rel=0.1), layer
        else:
            expected = math.sqrt(2 / fan_in) if init == "he_normal" else 0.01
            assert std == pytest.approx(expected, rel=0.1), (layer, std, expected)
            assert peak > 2.5 * std, layer  # tails: not a uniform draw of the same std
    assert checked >= 3 or init == "zeros"


def test_width_depth_and_stem_stride_change_the_network():
    base = build_model(small())
    wide = build_model(small("model.width=16"))
    deep = build_model(small("model.depth=2"))
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(wide) > count(base) and count(deep) > count(base)
    images = torch.rand(1, 3, 64, 64)
    assert build_model(small("model.stem_stride=1")).trunk(images).shape[-1] == 8  # 3 stride-2 stages
    assert build_model(small("model.stem_stride=2")).trunk(images).shape[-1] == 4


def test_torchvision_backbone_with_local_weights(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    net = build_model(compose("model=gpu", f"model.weights={tmp_path / 'resnet18.pth'}"))
    torch.testing.assert_close(net.trunk[0].weight, state["conv1.weight"])
    assert net(torch.rand(2, 3, 64, 64))["rot"].shape == (2, 6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=gpu", "model.arch=resnet_nonexistent"], "model.arch: unknown torchvision model"),
        (["model=gpu", "model.width=8"], "model.width applies to model.arch=small_resnet only"),
        (["model=gpu", "model.weights=/nonexistent.pth"], "model.weights: no such file"),
        (["model.init=uniform_nonsense"], "model.init must be one of"),
        (["model.width=0"], "model: width, depth and stages must be >= 1"),
    ],
)
def test_bad_model_config_is_a_clear_error(overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_model(compose(*overrides))


def test_initialize_rejects_unknown_init():
    with pytest.raises(ValueError, match="model.init"):
        initialize(torch.nn.Linear(2, 2), "orthogonal_typo")
