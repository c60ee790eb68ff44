"""Pose losses, selected by the Hydra config group `loss` (configs/loss/<name>.yaml).

    build_criterion(loss_cfg, model_points_mm=None, symmetric=False, image_size=None) -> PoseCriterion
    criterion(out, batch) -> (loss, parts)

`out` is the network's raw output {"rot": [B, D], "trans": [B, 3]} (D = geometry.rotation_dim(rotation_of(loss_cfg)));
`batch` is a BopDataset batch with "R" [B, 3, 3], "t" [B, 3] (mm), "K" [B, 3, 3] and "image" [B, 3, H, W]
(the image only supplies (H, W) for the translation modes "centre_depth" and "centre_focal_depth", or pass image_size).
`loss` is a scalar tensor to backpropagate; `parts` maps names to detached 0-dim tensors (use float(v)):
"loss", "rot" and "trans" (the unweighted terms), "rot_err_deg" and "trans_err_mm" (batch means of the
decoded pose's errors, for monitoring). `criterion.per_sample(out, batch)` gives the same per sample ([B]
tensors, no gradient), for the doctor. The criterion also exposes `.rotation` (representation the network
must output) and `.translation` (translation mode) so the model can be built to match.

Config keys: name, rotation (point_matching only: euler | quaternion | sixd; the other losses fix it, see
`rotation_of`), translation (direct | centre_depth | centre_focal_depth),
rotation_weight, translation_weight, and for point_matching n_points (model points used, default 500).

Losses (each term: squared error summed over components, averaged over the batch):
- euler_l2: the talk's seed baseline. L2 on (x, y, z) and L2 on Euler angles (phi, theta, psi) against
  roma.rotmat_to_euler targets. No wrap-around handling on purpose: a prediction of +179 deg for a target
  of -179 deg costs as much as a 358 deg error, and near theta = +-90 deg (gimbal lock) the targets jump.
- quaternion: sign-invariant, min(|q - q_hat|^2, |q + q_hat|^2) with q_hat the normalised output (q and -q
  are the same rotation).
- sixd: Zhou et al. 2019 continuous 6D representation; squared Frobenius distance between rotation matrices,
  |R_hat - R|_F^2 = 4 (1 - cos angle).
- point_matching: PoseCNN's PLoss, mean over model points x of |R_hat x - R x|^2, points in units of the
  object's diameter (so the value does not depend on the object's size); for a symmetric object the
  ShapeMatch-Loss, mean over x of min over model points y of |R_hat x - R y|^2, which is zero for any
  rotation that maps the point set onto itself. PoseCNN's constant 1/2 is left out.
The translation term is the L2 between the raw output and geometry.encode_translation of the ground truth.
"""

import torch

from . import geometry

LOSSES = ("euler_l2", "quaternion", "sixd", "point_matching")
# The representation a loss needs; point_matching works on rotation matrices from any representation.
_REQUIRED_REPRESENTATION = {"euler_l2": "euler", "quaternion": "quaternion", "sixd": "sixd"}


def _squared_distances(a, b):
    """Pairwise squared distances [B, N, M] between point sets a [B, N, 3] and b [B, M, 3].

    Written as |a|^2 + |b|^2 - 2ab instead of torch.cdist: cdist's gradient is NaN at zero distance,
    which is exactly where ShapeMatch sits at the ground truth.
    """
    d2 = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(-2) - 2.0 * a @ b.transpose(-1, -2)
    return d2.clamp_min(0.0)


class PoseCriterion:
    def __init__(
        self,
        name,
        rotation,
        translation,
        rotation_weight,
        translation_weight,
        points=None,
        symmetric=False,
        image_size=None,
    ):
        self.name = name
        self.rotation = rotation
        self.translation = translation
        self.rotation_weight = float(rotation_weight)
        self.translation_weight = float(translation_weight)
        self.points = points  # [N, 3] in units of the object's diameter, point_matching only
        self.symmetric = bool(symmetric)
        self.image_size = image_size

    def __repr__(self):
        return (
            f"PoseCriterion(name={self.name!r}, rotation={self.rotation!r}, translation={self.translation!r}, "
            f"rotation_weight={self.rotation_weight}, translation_weight={self.translation_weight}, "
            f"symmetric={self.symmetric})"
        )

    def _image_size(self, batch):
        if self.image_size is not None:
            return self.image_size
        if "image" in batch:
            return tuple(batch["image"].shape[-2:])
        return None

    def rotation_terms(self, raw_rot, R_gt):
        """The rotation term before the batch mean: [B] (one value per sample), or [B, N] (per model point)."""
        if self.name == "euler_l2":
            target = geometry.rotmat_to_target(R_gt, "euler")
            return ((raw_rot - target) ** 2).sum(-1)
        if self.name == "quaternion":
            q_hat = torch.nn.functional.normalize(raw_rot, dim=-1, eps=1e-8)
            q = geometry.rotmat_to_target(R_gt, "quaternion")
            return torch.minimum(((q_hat - q) ** 2).sum(-1), ((q_hat + q) ** 2).sum(-1))
        R_hat = geometry.raw_to_rotmat(raw_rot, self.rotation)
        if self.name == "sixd":
            return ((R_hat - R_gt) ** 2).sum((-1, -2))
        if self.points.device != R_gt.device or self.points.dtype != R_gt.dtype:
            self.points = self.points.to(device=R_gt.device, dtype=R_gt.dtype)  # once, not every step
        points = self.points
        pred = points @ R_hat.transpose(-1, -2)  # [B, N, 3]
        gt = points @ R_gt.transpose(-1, -2)
        if self.symmetric:
            return _squared_distances(pred, gt).min(-1).values
        return ((pred - gt) ** 2).sum(-1)

    def _terms(self, out, batch):
        """(rotation terms [B] or [B, N], translation terms [B], image size)."""
        raw_rot, raw_trans = out["rot"], out["trans"]
        image_size = self._image_size(batch)
        target_trans = geometry.encode_translation(batch["t"], batch["K"], self.translation, image_size)
        return self.rotation_terms(raw_rot, batch["R"]), ((raw_trans - target_trans) ** 2).sum(-1), image_size

    @torch.no_grad()
    def _errors(self, out, batch, image_size):
        """The decoded pose's errors per sample: rotation (degrees) and translation (mm)."""
        R_hat = geometry.raw_to_rotmat(out["rot"].detach(), self.rotation)
        t_hat = geometry.decode_translation(out["trans"].detach(), batch["K"], self.translation, image_size)
        return geometry.geodesic_angle_deg(R_hat, batch["R"]), (t_hat - batch["t"]).norm(dim=-1)

    def __call__(self, out, batch):
        rot_terms, trans_terms, image_size = self._terms(out, batch)
        rot, trans = rot_terms.mean(), trans_terms.mean()
        loss = self.rotation_weight * rot + self.translation_weight * trans
        rot_err, trans_err = self._errors(out, batch, image_size)
        parts = {
            "loss": loss.detach(),
            "rot": rot.detach(),
            "trans": trans.detach(),
            "rot_err_deg": rot_err.mean(),
            "trans_err_mm": trans_err.mean(),
        }
        return loss, parts

    @torch.no_grad()
    def per_sample(self, out, batch):
        """(losses [B], parts {name: [B]}): what `criterion` gives on each one-sample slice of the batch, in
        one call (the doctor scores every validation sample; one call per sample was most of its time)."""
        rot_terms, trans_terms, image_size = self._terms(out, batch)
        rot = rot_terms.reshape(len(rot_terms), -1).mean(1)
        loss = self.rotation_weight * rot + self.translation_weight * trans_terms
        rot_err, trans_err = self._errors(out, batch, image_size)
        parts = {
            "loss": loss,
            "rot": rot,
            "trans": trans_terms,
            "rot_err_deg": rot_err,
            "trans_err_mm": trans_err,
        }
        return loss, parts


def _diameter_units(model_points_mm, n_points, seed=0):
    points = torch.as_tensor(model_points_mm, dtype=torch.float32)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2:
        raise ValueError(
            f"model_points_mm must be an (N, 3) array with N >= 2, got shape {tuple(points.shape)}"
        )
    if len(points) > n_points:
        generator = torch.Generator().manual_seed(seed)
        points = points[torch.randperm(len(points), generator=generator)[:n_points]]
    diameter = torch.cdist(points, points).max()
    if not diameter > 0:
        raise ValueError("model_points_mm are all the same point: the object has no extent")
    return points / diameter


def rotation_of(loss_cfg):
    """The rotation representation the network outputs, from one source: the one the loss's name needs
    (euler_l2, quaternion, sixd), else `loss.rotation` (point_matching works with any; default sixd)."""
    name, given = loss_cfg.get("name"), loss_cfg.get("rotation")
    required = _REQUIRED_REPRESENTATION.get(name)
    if required is not None and given not in (None, required):
        raise ValueError(f"loss.name={name} needs loss.rotation={required}, got loss.rotation={given}")
    rotation = required or given or "sixd"
    geometry.rotation_dim(rotation)  # raises on an unknown representation
    return rotation


def build_criterion(loss_cfg, model_points_mm=None, symmetric=False, image_size=None):
    """The loss named by `loss_cfg.name` (see the module docstring); raises ValueError on a bad config."""
    name = loss_cfg.get("name")
    if name not in LOSSES:
        raise ValueError(f"loss.name={name!r} is not a known loss; expected one of {LOSSES}")
    rotation = rotation_of(loss_cfg)
    translation = loss_cfg.get("translation")
    geometry.translation_dim(translation)  # raises on an unknown mode
    points = None
    if name == "point_matching":
        if model_points_mm is None:
            raise ValueError("loss.name=point_matching needs the object's model points (model_points_mm)")
        points = _diameter_units(model_points_mm, int(loss_cfg.get("n_points", 500)))
    return PoseCriterion(
        name,
        rotation,
        translation,
        loss_cfg.get("rotation_weight", 1.0),
        loss_cfg.get("translation_weight", 1.0),
        points=points,
        symmetric=symmetric,
        image_size=image_size,
    )
