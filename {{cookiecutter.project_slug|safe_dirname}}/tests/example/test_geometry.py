"""Rotation representations, translation encodings and projection (seeded random loops, no hypothesis)."""

import math

import pytest
import roma
import torch

from {{ cookiecutter.package_name }}.pose import geometry

REPRESENTATIONS = geometry.ROTATION_REPRESENTATIONS


def random_rotations(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    quat = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return roma.unitquat_to_rotmat(quat / quat.norm(dim=-1, keepdim=True))


def random_intrinsics(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    K = torch.zeros(n, 3, 3, dtype=torch.float64)
    K[:, 0, 0] = 400 + 200 * torch.rand(n, generator=generator, dtype=torch.float64)
    K[:, 1, 1] = 400 + 200 * torch.rand(n, generator=generator, dtype=torch.float64)
    K[:, 0, 2] = 100 + 20 * torch.rand(n, generator=generator, dtype=torch.float64)
    K[:, 1, 2] = 80 + 20 * torch.rand(n, generator=generator, dtype=torch.float64)
    K[:, 2, 2] = 1
    return K


def random_translations(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    t = (torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5) * 200
    t[:, 2] = 300 + 700 * torch.rand(n, generator=generator, dtype=torch.float64)
    return t


def test_rotation_dims():
    assert [geometry.rotation_dim(r) for r in REPRESENTATIONS] == [3, 4, 6]


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_target_round_trip(representation):
    R = random_rotations(256, seed=1)
    target = geometry.rotmat_to_target(R, representation)
    assert target.shape == (256, geometry.rotation_dim(representation))
    back = geometry.raw_to_rotmat(target, representation)
    assert torch.allclose(back, R, atol=1e-9)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_any_raw_output_gives_a_rotation(representation):
    generator = torch.Generator().manual_seed(2)
    raw = (
        torch.randn(128, geometry.rotation_dim(representation), generator=generator, dtype=torch.float64) * 3
    )
    R = geometry.raw_to_rotmat(raw, representation)
    eye = torch.eye(3, dtype=torch.float64).expand(128, 3, 3)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-9)
    assert torch.allclose(torch.linalg.det(R), torch.ones(128, dtype=torch.float64), atol=1e-9)


def test_euler_convention_is_extrinsic_xyz():
    phi, theta, psi = 0.3, -0.4, 1.1

    def axis(index, angle):
        rotvec = torch.zeros(3, dtype=torch.float64)
        rotvec[index] = angle
        return roma.rotvec_to_rotmat(rotvec)

    R = geometry.raw_to_rotmat(torch.tensor([phi, theta, psi], dtype=torch.float64), "euler")
    assert torch.allclose(R, axis(2, psi) @ axis(1, theta) @ axis(0, phi), atol=1e-12)


def test_euler_targets_wrap_at_pi():
    # Two rotations 2 degrees apart about z whose Euler targets differ by ~358 degrees: the baseline's trap.
    z_angles = torch.tensor(
        [[0.0, 0.0, math.radians(179.0)], [0.0, 0.0, math.radians(-179.0)]], dtype=torch.float64
    )
    R = geometry.raw_to_rotmat(z_angles, "euler")
    targets = geometry.rotmat_to_target(R, "euler")
    assert geometry.geodesic_angle_deg(R[0], R[1]).item() == pytest.approx(2.0, abs=1e-6)
    assert abs(targets[0, 2] - targets[1, 2]).item() == pytest.approx(math.radians(358.0), abs=1e-6)


def test_quaternion_output_is_sign_and_scale_free():
    generator = torch.Generator().manual_seed(3)
    raw = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    R = geometry.raw_to_rotmat(raw, "quaternion")
    assert torch.allclose(geometry.raw_to_rotmat(-2.5 * raw, "quaternion"), R, atol=1e-12)


def test_sixd_uses_first_two_columns():
    R = random_rotations(32, seed=4)
    raw = geometry.rotmat_to_target(R, "sixd")
    assert torch.equal(raw[:, :3], R[:, :, 0]) and torch.equal(raw[:, 3:], R[:, :, 1])


def test_geodesic_angle_of_known_rotation():
    R = random_rotations(64, seed=5)
    generator = torch.Generator().manual_seed(5)
    angles = torch.rand(64, generator=generator, dtype=torch.float64) * math.pi * 0.999
    axes = torch.nn.functional.normalize(torch.randn(64, 3, generator=generator, dtype=torch.float64), dim=-1)
    R2 = roma.rotvec_to_rotmat(axes * angles[:, None]) @ R
    assert torch.allclose(geometry.geodesic_angle_deg(R, R2), torch.rad2deg(angles), atol=1e-6)
    assert torch.allclose(geometry.geodesic_angle_deg(R, R), torch.zeros(64, dtype=torch.float64), atol=1e-6)


def test_project_then_backproject_recovers_points():
    n = 64
    R, t, K = random_rotations(n, seed=6), random_translations(n, seed=6), random_intrinsics(n, seed=6)
    K[:, 0, 1] = 0.5  # a skewed camera still round-trips
    points = torch.randn(n, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 30
    uv = geometry.project(points, R, t, K)
    cam = points @ R.transpose(-1, -2) + t[:, None]
    back = geometry.backproject(uv, cam[..., 2], K[:, None])
    assert torch.allclose(back, cam, atol=1e-8)


def test_project_matches_pinhole_formula():
    K = torch.tensor([[500.0, 0, 64], [0, 520.0, 48], [0, 0, 1]], dtype=torch.float64)
    t = torch.tensor([10.0, -20.0, 400.0], dtype=torch.float64)
    uv = geometry.project(torch.zeros(1, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), t, K)
    assert torch.allclose(uv, torch.tensor([[64 + 500 * 10 / 400, 48 - 520 * 20 / 400]], dtype=torch.float64))


@pytest.mark.parametrize("mode", geometry.TRANSLATION_MODES)
@pytest.mark.parametrize("image_size", [(96, 128), 128])
def test_translation_round_trip(mode, image_size):
    t, K = random_translations(128, seed=7), random_intrinsics(128, seed=7)
    raw = geometry.encode_translation(t, K, mode, image_size)
    assert raw.shape == (128, 3)
    assert torch.allclose(geometry.decode_translation(raw, K, mode, image_size), t, atol=1e-8)


def test_centre_depth_encoding_is_normalised_image_position_and_log_depth():
    K = torch.tensor([[500.0, 0, 64], [0, 500.0, 48], [0, 0, 1]], dtype=torch.float64)
    at_principal_point = torch.tensor([0.0, 0.0, 1000.0], dtype=torch.float64)
    raw = geometry.encode_translation(at_principal_point, K, "centre_depth", (96, 128))
    assert torch.allclose(raw, torch.zeros(3, dtype=torch.float64))
    corner = geometry.decode_translation(
        torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64), K, "centre_depth", (96, 128)
    )
    assert torch.allclose(
        geometry.project(
            torch.zeros(1, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), corner, K
        ),
        torch.zeros(1, 2, dtype=torch.float64),
        atol=1e-9,
    )


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="rotation representation 'axis_angle'"):
        geometry.rotation_dim("axis_angle")
    with pytest.raises(ValueError, match="translation mode 'polar'"):
        geometry.encode_translation(torch.zeros(3), torch.eye(3), "polar")
    with pytest.raises(ValueError, match="image_size"):
        geometry.decode_translation(torch.zeros(3), torch.eye(3), "centre_depth")
    with pytest.raises(ValueError, match="sixd rotation needs 6 values"):
        geometry.raw_to_rotmat(torch.zeros(2, 4), "sixd")


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_float32_path_matches_float64(representation):
    # training runs in float32: every function gives the float64 values to float32 precision
    generator = torch.Generator().manual_seed(3)
    raw = torch.randn(64, geometry.rotation_dim(representation), generator=generator, dtype=torch.float64)
    R64 = geometry.raw_to_rotmat(raw, representation)
    R32 = geometry.raw_to_rotmat(raw.float(), representation)
    assert R32.dtype == torch.float32 and R32.shape == (64, 3, 3)
    torch.testing.assert_close(R32.double(), R64, atol=1e-5, rtol=0)
    target = geometry.rotmat_to_target(R64, representation)
    torch.testing.assert_close(
        geometry.rotmat_to_target(R64.float(), representation).double(), target, atol=1e-5, rtol=1e-5
    )
    # the angle between the float32 and float64 rotations is float32 rounding, not a bug
    assert geometry.geodesic_angle_deg(R32.double(), R64).max() < 1e-3


@pytest.mark.parametrize("mode", geometry.TRANSLATION_MODES)
def test_float32_translation_and_projection_match_float64(mode):
    t, K, R = random_translations(64, seed=4), random_intrinsics(64, seed=4), random_rotations(64, seed=4)
    encoded = geometry.encode_translation(t, K, mode, image_size=(120, 160))
    encoded32 = geometry.encode_translation(t.float(), K.float(), mode, image_size=(120, 160))
    assert encoded32.dtype == torch.float32
    torch.testing.assert_close(encoded32.double(), encoded, atol=1e-5, rtol=1e-5)
    decoded32 = geometry.decode_translation(encoded32, K.float(), mode, image_size=(120, 160))
    torch.testing.assert_close(decoded32.double(), t, atol=1e-2, rtol=1e-5)  # mm
    points = torch.randn(64, 10, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 50
    uv = geometry.project(points, R, t, K)
    uv32 = geometry.project(points.float(), R.float(), t.float(), K.float())
    torch.testing.assert_close(uv32.double(), uv, atol=1e-3, rtol=0)  # pixels
