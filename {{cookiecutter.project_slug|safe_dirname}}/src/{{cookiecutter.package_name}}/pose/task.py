"""The 6D pose example as a lifecycle task (task.Task): BOP data, PoseNet, the pose losses, the bug zoo's
faults, the pose errors that evaluation writes. The generic stages know the example only through this class.
"""

import functools
import math

import torch

from .. import task
from ..data import bop
from ..debugging import zoo
from . import draw, errors, geometry, losses
from . import metrics as pose_metrics
from .model import PoseEstimator, build_model


class PoseTask(task.Task):
    input_key = "image"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.diameter_mm = None  # of the object, set by build_loss (it reads the models)
        self.points_mm = None  # up to 256 of its model points, set by build_loss

    def build_datasets(self, cfg):
        d = cfg.data
        if d.get("input", "frame") == "crop" and cfg.loss.translation != "centre_focal_depth":
            raise ValueError(
                f"data.input=crop needs loss.translation=centre_focal_depth (got {cfg.loss.translation}): a "
                "zoomed-in crop shows every object at about the same size, so only depth / focal length can be learnt"
            )
        train_set = bop.dataset_from_config(d, d.splits.train, "train")
        val_set = bop.dataset_from_config(d, d.splits.val, "val")
        return train_set, val_set

    def build_loss(self, cfg, train_set):
        info = bop.load_models_info(cfg.data.root)[cfg.data.obj_id]
        self.diameter_mm = float(info["diameter"])
        points = torch.as_tensor(bop.load_model_points(cfg.data.root, cfg.data.obj_id), dtype=torch.float32)
        self.points_mm = points[:: max(1, len(points) // 256)]
        criterion = losses.build_criterion(
            cfg.loss, points, bop.is_symmetric(info), image_size=cfg.data.image_size
        )
        return zoo.fault_loss(cfg, criterion)  # the criterion itself unless a loss fault is injected

    def build_model(self, cfg):
        return build_model(cfg)

    def train_transform(self, cfg):
        max_deg = cfg.training.augment.rotate_deg
        augment = functools.partial(rotate_in_plane, max_deg=max_deg) if max_deg else None
        return zoo.fault_augment(cfg, augment)  # the augmentation itself unless a fault is injected in it

    def val_errors(self, model, out, batch):
        R, t = model.decode(out, batch["K"], batch["image"].shape[-2:])
        # the same error definitions as the test-set evaluation (bop_toolkit's re and te)
        return {
            "re_deg": torch.as_tensor(pose_metrics.rotation_error_deg(R, batch["R"]), dtype=torch.float32),
            "te_cm": torch.as_tensor(
                pose_metrics.translation_error_mm(t, batch["t"]) / 10.0, dtype=torch.float32
            ),
        }

    def preview(self, model, batch):
        """Validation images with the predicted (bright) and true (dark) object axes drawn on them."""
        images = batch["image"]
        R, t = model.decode(model(images), batch["K"], images.shape[-2:])
        cpu = {k: batch[k].cpu() for k in ("K", "R", "t")}
        true = list(zip(cpu["R"], cpu["t"], strict=True))
        predicted = list(zip(R.cpu(), t.cpu(), strict=True))
        return draw.pose_grid(images.cpu(), cpu["K"], true, predicted, 0.5 * self.diameter_mm)

    def draw_labels(self, batch):
        """The poses drawn as images (draw.label_drawing): the doctor augments this drawing and compares it with
        a drawing of the augmented poses."""
        image, K = batch["image"], batch["K"]
        points = self.points_mm.to(device=K.device, dtype=K.dtype)
        return draw.label_drawing(points, K, batch["R"].to(K.dtype), batch["t"].to(K.dtype), image.shape[-2:])

    def fault_datasets(self, cfg, train_set, val_set):
        return zoo.fault_datasets(cfg, train_set, val_set)

    def fault_batch(self, cfg):
        return zoo.pixel_fault(cfg)

    def fault_model(self, cfg, model):
        return zoo.fault_model(cfg, model)

    def fault_of(self, cfg):
        return zoo.fault_of(cfg)

    def target(self, batch):
        """Translation (m) and rotation matrix entries: what the order and shortcut probes correlate."""
        t = torch.as_tensor(batch["t"]).float() / 1000.0
        R = torch.as_tensor(batch["R"]).float().reshape(len(t), -1)
        return torch.cat([t, R], 1)

    # error analysis and metric review (pose/errors.py)
    sample_id_columns = errors.POSE_ID_COLUMNS
    image_column = "rgb_path"
    sheet_columns = errors.POSE_SHEET_COLUMNS
    slice_medians = ("re_deg", "te_cm")
    contact_sheet_legend = "; GT axes green, predicted red"

    def error_columns(self, table):
        if errors.has_pose_columns(table):
            errors.add_pose_columns(table)

    def error_tags(self, table, thresholds):
        return errors.pose_tags(table, thresholds) if errors.has_pose_columns(table) else {}

    def error_slices(self, table):
        return errors.pose_slices(table) if errors.has_pose_columns(table) else {}

    def draw_error(self, image, table, i, scale):
        return errors.draw_error(image, table, i, scale)

    def inference_model(self, net, cfg):
        return PoseEstimator(net, views=cfg.model.get("test_views", 1))

    def evaluate(self, cfg, trained_cfg, model, device, out_dir):
        from .evaluation import evaluate_pose  # bop_toolkit-style metrics and plots: only when evaluating

        return evaluate_pose(cfg, trained_cfg, model, device, out_dir)


def rotate_in_plane(batch, max_deg):
    """Augmentation: turn the camera about the ray through the image centre by a random angle in
    [-max_deg, max_deg] (geometry.turn_about_centre: the image warped exactly, R' = Q R, t' = Q t, K unchanged).
    A new view of the object's orientation per sample, without rendering more images. `batch` holds
    image [B,3,H,W], K, R, t; the random angles come from torch's global generator (the training loader
    seeds it per batch, loaders.py).
    """
    K = batch["K"]
    angles = (torch.rand(len(K), device=K.device) * 2 - 1) * math.radians(max_deg)
    turned, Q = geometry.turn_about_centre(batch["image"], K, angles)
    return batch | {"image": turned, "R": Q @ batch["R"], "t": (Q @ batch["t"].unsqueeze(-1)).squeeze(-1)}
