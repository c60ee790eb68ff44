"""Pose geometry: rotation representations (through roma), translation encodings, projection.

Conventions (BOP): a pose (R, t) maps model points X (mm) to the OpenCV camera frame, X_cam = R X + t;
t is in mm; K is the 3x3 pinhole intrinsics (pixels). Every function works on batches (leading dims ...).

Rotation representations, the network's raw rotation output and what it means:

- ``"euler"`` (3): angles (phi, theta, psi) in radians, roma convention ``"xyz"`` = EXTRINSIC rotations
  about the fixed camera axes x, then y, then z, i.e. R = Rz(psi) @ Ry(theta) @ Rx(phi). Targets from
  ``roma.rotmat_to_euler("xyz", R)`` lie in phi, psi in (-pi, pi], theta in [-pi/2, pi/2]: they wrap
  around at +-pi and are ambiguous at theta = +-pi/2 (gimbal lock), which is what the Euler baseline
  trips over.
- ``"quaternion"`` (4): a quaternion in roma's XYZW order, normalised here (so any non-zero 4-vector works).
- ``"sixd"`` (6): Zhou et al. 2019, "On the continuity of rotation representations in neural networks":
  raw[..., 0:3] and raw[..., 3:6] are the first and second columns of R before Gram-Schmidt
  (``roma.special_gramschmidt``).

Translation encodings (``mode``), the network's raw translation output:

- ``"direct"``: (x, y, z) / 100 mm, i.e. decimetres, so an L2 on them has the same scale as an L2 on
  angles in radians for objects a few decimetres from the camera.
- ``"centre_depth"`` (PoseCNN-style): (u_n, v_n, log z) with (u, v) the projection of the object origin,
  u_n = 2 u / W - 1, v_n = 2 v / H - 1 (so [-1, 1] across the image) and z the depth in metres; decoding
  back-projects (u, v) with K at depth z. Needs the image size the network sees (K must match it).
- ``"centre_focal_depth"`` (CDPN's scale-invariant translation): (u_n, v_n, log(z / f)) with z in mm and
  f = sqrt(fx fy) in pixels: the depth in focal lengths. A zoomed-in crop (data.input=crop) scales f with
  the zoom and hides the object's distance (every crop shows the object at about the same size), so the
  network can only see z / f, not z; decoding multiplies by the crop's own f.

Public API (signatures are stable; training, model, export and evaluation use them):

    ROTATION_REPRESENTATIONS = ("euler", "quaternion", "sixd")
    TRANSLATION_MODES = ("direct", "centre_depth", "centre_focal_depth")
    EULER_CONVENTION = "xyz"
    rotation_dim(representation) -> int
    raw_to_rotmat(raw[..., D], representation) -> R[..., 3, 3]
    rotmat_to_target(R[..., 3, 3], representation) -> raw-like target[..., D]
    translation_dim(mode) -> 3
    encode_translation(t_mm[..., 3], K[..., 3, 3], mode, image_size=None) -> raw[..., 3]
    decode_translation(raw[..., 3], K[..., 3, 3], mode, image_size=None) -> t_mm[..., 3]
    project(points[..., N, 3] mm, R[..., 3, 3], t[..., 3] mm, K[..., 3, 3]) -> uv[..., N, 2] pixels
    backproject(uv[..., 2] pixels, z[...] mm, K[..., 3, 3]) -> X_cam[..., 3] mm
    geodesic_angle_deg(R1[..., 3, 3], R2[..., 3, 3]) -> angle[...] degrees
    turn_about_centre(images[B, C, H, W], K[B, 3, 3], angles[B] radians) -> (turned images, Q[B, 3, 3])

``image_size`` is (height, width) in pixels, or one int for square images; ``"direct"`` ignores it.
"""

import math

import roma
import torch
import torch.nn.functional as F

ROTATION_REPRESENTATIONS = ("euler", "quaternion", "sixd")
TRANSLATION_MODES = ("direct", "centre_depth", "centre_focal_depth")
EULER_CONVENTION = "xyz"
DIRECT_SCALE_MM = 100.0
_ROTATION_DIMS = {"euler": 3, "quaternion": 4, "sixd": 6}
# Keeps Gram-Schmidt and quaternion normalisation finite for a degenerate (near-zero) network output.
_EPS = 1e-8


def _check_representation(representation):
    if representation not in _ROTATION_DIMS:
        raise ValueError(
            f"unknown rotation representation {representation!r}; expected one of {ROTATION_REPRESENTATIONS}"
        )


def _check_mode(mode):
    if mode not in TRANSLATION_MODES:
        raise ValueError(f"unknown translation mode {mode!r}; expected one of {TRANSLATION_MODES}")


def rotation_dim(representation):
    """Number of raw network outputs for a rotation representation."""
    _check_representation(representation)
    return _ROTATION_DIMS[representation]


def translation_dim(mode):
    _check_mode(mode)
    return 3


def raw_to_rotmat(raw, representation):
    """Raw network rotation output [..., D] -> rotation matrices [..., 3, 3]."""
    dim = rotation_dim(representation)
    if raw.shape[-1] != dim:
        raise ValueError(
            f"{representation} rotation needs {dim} values per sample, got shape {tuple(raw.shape)}"
        )
    if representation == "euler":
        return roma.euler_to_rotmat(EULER_CONVENTION, raw)
    if representation == "quaternion":
        return roma.unitquat_to_rotmat(F.normalize(raw, dim=-1, eps=_EPS))
    columns = torch.stack((raw[..., 0:3], raw[..., 3:6]), dim=-1)  # [..., 3, 2]
    return roma.special_gramschmidt(columns, epsilon=_EPS)


def rotmat_to_target(R, representation):
    """Rotation matrices [..., 3, 3] -> the regression target in `representation` ([..., D]).

    Euler: roma.rotmat_to_euler (wraps at +-pi); quaternion: roma.rotmat_to_unitquat (XYZW, sign
    arbitrary, losses must be sign-invariant); sixd: the first two columns of R, as raw_to_rotmat reads them.
    """
    _check_representation(representation)
    if representation == "euler":
        return roma.rotmat_to_euler(EULER_CONVENTION, R)
    if representation == "quaternion":
        return roma.rotmat_to_unitquat(R)
    return torch.cat((R[..., :, 0], R[..., :, 1]), dim=-1)


def _image_hw(image_size):
    if image_size is None:
        raise ValueError(
            "translation modes 'centre_depth' and 'centre_focal_depth' need image_size=(height, width) of the network input"
        )
    if isinstance(image_size, int | float):
        return float(image_size), float(image_size)
    height, width = image_size
    return float(height), float(width)


def project(points, R, t, K):
    """Project model points [..., N, 3] (mm) under pose (R, t mm) with intrinsics K -> pixels [..., N, 2]."""
    cam = points @ R.transpose(-1, -2) + t.unsqueeze(-2)
    uvw = cam @ K.transpose(-1, -2)
    return uvw[..., :2] / uvw[..., 2:3]


def backproject(uv, z, K):
    """Pixels [..., 2] at depth z [...] (mm) -> camera-frame points [..., 3] (mm).

    Written out instead of K^-1 so that it exports to ONNX (no matrix inverse); handles skew K[0, 1].
    """
    fx, fy = K[..., 0, 0], K[..., 1, 1]
    skew, cx, cy = K[..., 0, 1], K[..., 0, 2], K[..., 1, 2]
    y_n = (uv[..., 1] - cy) / fy
    x_n = (uv[..., 0] - cx - skew * y_n) / fx
    return torch.stack((x_n * z, y_n * z, z), dim=-1)


def _focal(K):
    """sqrt(fx fy): one focal length in pixels (fx = fy for square pixels)."""
    return torch.sqrt(K[..., 0, 0] * K[..., 1, 1])


def encode_translation(t_mm, K, mode, image_size=None):
    """Translation t (mm) [..., 3] -> the network's raw translation target [..., 3] in `mode`."""
    _check_mode(mode)
    if mode == "direct":
        return t_mm / DIRECT_SCALE_MM
    height, width = _image_hw(image_size)
    uvw = (K @ t_mm.unsqueeze(-1)).squeeze(-1)  # projection of the model origin
    uv = uvw[..., :2] / uvw[..., 2:3]
    if mode == "centre_focal_depth":
        depth = t_mm[..., 2].clamp_min(_EPS) / _focal(K)
    else:
        depth = (t_mm[..., 2] / 1000.0).clamp_min(_EPS)  # metres
    return torch.stack(
        (2.0 * uv[..., 0] / width - 1.0, 2.0 * uv[..., 1] / height - 1.0, torch.log(depth)), -1
    )


def decode_translation(raw, K, mode, image_size=None):
    """The network's raw translation [..., 3] in `mode` -> translation t (mm) [..., 3]."""
    _check_mode(mode)
    if raw.shape[-1] != 3:
        raise ValueError(f"translation needs 3 values per sample, got shape {tuple(raw.shape)}")
    if mode == "direct":
        return raw * DIRECT_SCALE_MM
    height, width = _image_hw(image_size)
    uv = torch.stack(((raw[..., 0] + 1.0) * width / 2.0, (raw[..., 1] + 1.0) * height / 2.0), dim=-1)
    scale = _focal(K) if mode == "centre_focal_depth" else 1000.0
    z_mm = torch.exp(raw[..., 2]) * scale
    return backproject(uv, z_mm, K)


def geodesic_angle_deg(R1, R2):
    """Angle (degrees) of the relative rotation R1^T R2, in [0, 180] (bop_toolkit's rotation error `re`)."""
    return roma.rotmat_geodesic_distance(R1, R2) * (180.0 / math.pi)


def turn_about_centre(images, K, angles):
    """The images a camera turned about the ray through the image centre by `angles` (radians) would see.

    A camera turned by Q sees X' = Q X: a pose becomes (Q R, Q t) with K unchanged, and the image is the old
    one warped by the homography K Q K^-1 (exact for any pinhole K: fx != fy, a principal point anywhere,
    as in a crop of a real frame). Turning about the ray through the centre keeps the centre pixel (a crop's
    object) in place; for a centred camera that ray is the optical axis and the warp a plain rotation about
    the principal point (exact pixel moves at multiples of 90 degrees). Corners from outside the old image
    are black. Returns (turned images [B, C, H, W], Q [B, 3, 3]). Written with backproject/project instead
    of K^-1 so that it exports to ONNX (the test-time views in model.PoseEstimator).
    """
    # No len(K) below: the exported batch axis must stay dynamic
    H, W = images.shape[-2:]
    ones = torch.ones_like(K[:, 0, 0])  # [B]
    centre = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=K.dtype, device=K.device)
    ray = backproject(centre, ones, K)
    Q = roma.rotvec_to_rotmat(ray / ray.norm(dim=-1, keepdim=True) * angles[:, None].to(K.dtype))
    # Each output pixel p' samples the input at K Q^T K^-1 p' (pixel centres at integers, BOP/OpenCV)
    v, u = torch.meshgrid(
        torch.arange(H, dtype=K.dtype, device=K.device),
        torch.arange(W, dtype=K.dtype, device=K.device),
        indexing="ij",
    )
    pixels = torch.stack([u, v], -1).reshape(1, -1, 2)  # [1,HW,2]
    rays = backproject(pixels, ones[:, None] * torch.ones_like(pixels[..., 0]), K[:, None])  # [B,HW,3]
    source = (rays @ Q) @ K.transpose(1, 2)  # rows: (K Q^T ray)^T
    src_u, src_v = (source[..., :2] / source[..., 2:]).unbind(-1)
    # grid_sample's align_corners=False puts pixel i's centre at (2i + 1) / size - 1
    grid = torch.stack([(2 * src_u + 1) / W - 1, (2 * src_v + 1) / H - 1], -1).view(-1, H, W, 2)
    turned = F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return turned, Q
