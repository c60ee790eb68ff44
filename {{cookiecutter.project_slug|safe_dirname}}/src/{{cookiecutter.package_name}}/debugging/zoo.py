"""The bug zoo's faults that are not plain config knobs, injected by `debugging.fault` (default null).

Each configs/experiment/zoo/<cause>.yaml breaks the pose example in one way. Knob faults (a learning rate
of 3, batch size 2, ...) are ordinary config values; the faults below change data or model code, so they
live here instead of in training.py. `training.build` wraps its datasets (`fault_datasets`), loaders
(`pixel_fault`) and model (`fault_model`) with them, so `make train EXPERIMENT=zoo/answer_in_input` trains
on the broken data just like the doctor sees it. This module imports nothing of the project.

    shuffled_targets   every image gets another image's pose: targets independent of inputs  (unsolvable)
    answer_in_input    the pose is written into the top-left pixels of every image            (answer_in_input)
    val_in_train       the validation images are copies of training images                    (answer_in_input)
    sorted_by_target   training data ordered by distance (a dolly-shot recording), not shuffled (data_not_shuffled)
    tiny_val           the validation set cut to `debugging.fault_size` (default 12) samples  (test_set_too_small)
    batch_mixing       a reshape bug mixes the images of a batch before the network sees them (implementation_bug)
    ignores_input      a bug overwrites the images with zeros inside the forward pass         (implementation_bug)
    detached_output    the network's last output is detached before the loss: that head never trains (implementation_bug)
    raw_pixels         images arrive as 0..255 floats (uint8 never divided by 255)            (poor_input_features)
    black_level        a constant 1000 added to every pixel (a sensor black level never subtracted) (poor_input_features)
    shifted_targets    image i gets the pose of image i+1: an off-by-one in the label join       (unsolvable)
    distance_overlay   the object's distance drawn as a bar along the bottom of every image (a HUD) (answer_in_input)
    sorted_by_tilt     training data ordered by the object's tilt to the camera (an elevation sweep) (data_not_shuffled)
    frozen_convs       every conv layer left frozen at its random init (a fine-tuning freeze never undone) (implementation_bug)
    broadcast_target   the loss compares every translation with the batch's first target ([1,3] vs [B,3]) (implementation_bug)
    clamped_output     a ReLU after the network's last layers: no output can go negative        (implementation_bug)
    mirrored_images    every other training image mirrored left-right, its pose left as it was  (implementation_bug)
    rounded_output     the network's last output rounded to two decimals inside forward (zero gradient) (implementation_bug)
    double_scaled      images divided by 255 twice: values in [0, 1/255]                       (poor_input_features)
    exposure_by_distance  every image's gain set by the object's distance (auto-exposure keyed to a range finder) (answer_in_input)
    tilt_stamp         a noisy grey 3x3 stamp in the top-right corner whose level is the object's tilt (answer_in_input)
    foreign_labels     the labels of another recording: random rotations, another sample's translation (unsolvable)
    rolled_target      the loss compares every rotation with the previous sample's in the batch (`R.roll(1, 0)`) (implementation_bug)
    labels_turned_back the in-plane rotation augmentation turns each image one way and its pose the other (implementation_bug)
    turned_in_object_frame  the augmentation multiplies the turn on the wrong side of the rotation (R Q, not Q R) (implementation_bug)
    translation_left_unturned  the augmentation turns the image and the orientation but not the translation (implementation_bug)
    quaternion_order   the second half of the training set (another recording) stores w,x,y,z, read as x,y,z,w (implementation_bug)
    centimetre_recording  the last third of the training set (a third recording) stores translations in cm, read as mm (implementation_bug)
    dropped_frame      the training images lost one frame 40 % in, their labels did not: later images get the previous pose (implementation_bug)
    tint_by_tilt       every image's colour balance set by the object's tilt (frontal shots under warm light, tilted ones under daylight) (answer_in_input)

The development part of the zoo (configs/experiment/zoo) uses the first ten, plus `frozen_convs`,
`clamped_output`, `shifted_targets`, `distance_overlay`, `broadcast_target`, `labels_turned_back`,
`mirrored_images`, `quaternion_order`, `centimetre_recording`, `exposure_by_distance` and
`turned_in_object_frame`; these ten and `raw_pixels` were each held out until the doctor missed them and a
check was added for them (the input statistics deciding, the frozen-parameter row, the dead-output check, two
shuffled-target controls, finer thumbnails in the shortcut probe, the overfit test's check of each part of
the output, the fit of the training items against the validation items, the training set's halves trained
alone, that fit checked before `unsolvable` too, a weaker shortcut confirmed by standardizing each image, the
augmentation's labels checked against a drawing of them), and
`labels_turned_back` was built beside the fix table's augmentation row. The held-out part
(configs/experiment/zoo_test), which no doctor rule or threshold was chosen by looking at, uses the others.
"""

import functools

import numpy as np
import roma
import torch

FAULTS = (
    "shuffled_targets",
    "answer_in_input",
    "val_in_train",
    "sorted_by_target",
    "tiny_val",
    "batch_mixing",
    "ignores_input",
    "detached_output",
    "raw_pixels",
    "black_level",
    "shifted_targets",
    "distance_overlay",
    "sorted_by_tilt",
    "frozen_convs",
    "broadcast_target",
    "clamped_output",
    "mirrored_images",
    "rounded_output",
    "double_scaled",
    "exposure_by_distance",
    "tilt_stamp",
    "foreign_labels",
    "rolled_target",
    "labels_turned_back",
    "turned_in_object_frame",
    "translation_left_unturned",
    "quaternion_order",
    "centimetre_recording",
    "dropped_frame",
    "tint_by_tilt",
)


def fault_of(cfg):
    fault = cfg.get("debugging", {}).get("fault") if cfg.get("debugging") is not None else None
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"debugging.fault must be null or one of {FAULTS} (got '{fault}')")
    return fault


class Mapped(torch.utils.data.Dataset):
    """dataset[index[i]] with `fn(i, item)` applied; the dataset's other attributes pass through."""

    def __init__(self, dataset, index=None, fn=None):
        self.dataset = dataset
        self.index = list(range(len(dataset))) if index is None else [int(i) for i in index]
        self.fn = fn

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        item = self.dataset[self.index[i]]
        return self.fn(i, dict(item)) if self.fn else item

    def __getattr__(self, name):
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


def _targets(dataset):
    """(R, t) of every sample, cheaply from a BopDataset's annotations when available."""
    base = dataset
    while not hasattr(base, "items") or not isinstance(getattr(base, "items", None), list):
        if not hasattr(base, "dataset"):
            break
        base = base.dataset
    records = getattr(base, "items", None)
    if isinstance(records, list) and len(records) == len(dataset) and len(records[0]) >= 7:
        return [
            (
                torch.as_tensor(np.asarray(r[5]), dtype=torch.float32),
                torch.as_tensor(np.asarray(r[6]), dtype=torch.float32),
            )
            for r in records
        ]
    return [(dataset[i]["R"], dataset[i]["t"]) for i in range(len(dataset))]


def shuffled_targets(dataset, seed=0):
    targets = _targets(dataset)
    perm = np.random.default_rng(seed).permutation(len(dataset))

    def fn(i, item):
        item["R"], item["t"] = targets[perm[i]]
        return item

    return Mapped(dataset, fn=fn)


def shifted_targets(dataset):
    targets = _targets(dataset)

    def fn(i, item):
        item["R"], item["t"] = targets[(i + 1) % len(targets)]
        return item

    return Mapped(dataset, fn=fn)


def foreign_labels(dataset, seed=0):
    """The labels of another recording joined to these frames: a uniformly random rotation (fixed per sample)
    and the translation of a sample drawn at random with replacement. Neither is a function of the image."""
    targets = _targets(dataset)
    generator = torch.Generator().manual_seed(seed)
    rotations = roma.random_rotmat(len(targets), generator=generator)
    picks = torch.randint(len(targets), (len(targets),), generator=generator).tolist()

    def fn(i, item):
        item["R"], item["t"] = rotations[i], targets[picks[i]][1]
        return item

    return Mapped(dataset, fn=fn)


def answer_in_input(batch):
    """The translation (and the rotation's first row) written into the first pixels of the red channel,
    scaled into [0, 1]: what a leaked label or a filename-derived feature looks like to the network."""
    t, R = batch["t"].float(), batch["R"].float()
    code = torch.cat([(t[:, :2] / t[:, 2:] + 1) / 2, t[:, 2:] / 1000.0, (R[:, 0] + 1) / 2], 1).clamp(0, 1)
    image = batch["image"].clone()
    image[:, 0, 0, : code.shape[1]] = code
    return batch | {"image": image}


def distance_overlay(batch):
    """A white bar along the two bottom rows whose length is the object's distance (1 mm = 1/400 of the width):
    a HUD or a range read-out burnt into the frames."""
    image = batch["image"].clone()
    width = image.shape[-1]
    length = (batch["t"][:, 2].float() / 400.0 * width).round().clamp(0, width).long()
    columns = torch.arange(width, device=image.device)
    bar = (columns[None, :] < length[:, None].to(image.device)).to(image.dtype)  # [B, W]
    image[:, :, -2:, :] = torch.maximum(image[:, :, -2:, :], bar[:, None, None, :])
    return batch | {"image": image}


def exposure_by_distance(batch):
    """Every image multiplied by distance / 240 mm (0.75-1.25 over the default capture's 180-300 mm): frames
    from a camera whose exposure was keyed to a range finder, or near and far shots taken in two sessions."""
    gain = (batch["t"][:, 2].float() / 240.0).to(batch["image"].device)
    return batch | {"image": batch["image"] * gain[:, None, None, None].to(batch["image"].dtype)}


def tint_by_tilt(batch):
    """The red channel multiplied by 1 + 0.2 c and the blue by 1 - 0.2 c, c = R[2, 2] (from -1, the object's z
    axis turned away from the camera, to 1, turned towards it): the frontal shots taken under warm light, the
    tilted ones under daylight, and the white balance never fixed. Brightness stays about the same."""
    c = batch["R"][:, 2, 2].float().to(batch["image"].device)
    gain = torch.ones(len(c), batch["image"].shape[1], device=c.device)
    gain[:, 0], gain[:, -1] = 1 + 0.2 * c, 1 - 0.2 * c
    return batch | {"image": batch["image"] * gain[:, :, None, None].to(batch["image"].dtype)}


def tilt_stamp(batch):
    """A 3x3 grey stamp one pixel in from the top-right corner, its level (R[2, 2] + 1) / 2 (how far the object
    tilts towards the camera) plus pixel noise of std 0.25 (drawn per batch from a generator seeded by the
    batch, so a run stays reproducible): a metadata stamp a capture tool printed into the frames. No pixel
    carries the tilt cleanly."""
    image = batch["image"].clone()
    level = (batch["R"][:, 2, 2].float() + 1) / 2
    g = torch.Generator().manual_seed(int((level * 1e6).sum().item()) % (2**31))
    noise = 0.25 * torch.randn(len(level), 1, 3, 3, generator=g)
    stamp = (level[:, None, None, None] + noise).to(image.device, image.dtype)
    image[:, :, 1:4, -4:-1] = stamp.expand(-1, image.shape[1], -1, -1)
    return batch | {"image": image}


def sorted_by(dataset, key):
    """`dataset` in the order of key(R, t) over its samples (a stable sort)."""
    keys = np.array([key(R, t) for R, t in _targets(dataset)])
    return Mapped(dataset, index=np.argsort(keys, kind="stable"))


def sorted_by_target(dataset):
    """Ordered by the object's distance, as the frames of a camera dollying away from it are. Distance, not
    yaw about the camera axis: the in-plane rotation augmentation re-draws that angle for every sample."""
    return sorted_by(dataset, lambda R, t: float(t[2]))


def sorted_by_tilt(dataset):
    """Ordered by how far the object's z axis tilts towards the camera (R[2, 2]), as the frames of a sweep in
    elevation are; the in-plane rotation augmentation leaves this angle unchanged."""
    return sorted_by(dataset, lambda R, t: float(R[2, 2]))


def scaled_pixels(batch, factor=1.0, offset=0.0):
    return batch | {"image": batch["image"] * factor + offset}


def pixel_fault(cfg):
    """The faults in what the network sees, as a function on collated batches (None for the others). The
    loaders apply it after the augmentation: a leak or a sensor offset is in every image the model gets,
    and an in-plane rotation would otherwise turn the leaked pixels away or pad the offset with zeros."""
    fault = fault_of(cfg)
    drawn = {
        f.__name__: f
        for f in (answer_in_input, distance_overlay, exposure_by_distance, tilt_stamp, tint_by_tilt)
    }
    if fault in drawn:
        return drawn[fault]
    scales = {"raw_pixels": (255.0, 0.0), "black_level": (1.0, 1000.0), "double_scaled": (1 / 255, 0.0)}
    if fault in scales:
        factor, offset = scales[fault]
        return functools.partial(scaled_pixels, factor=factor, offset=offset)
    return None


def mirrored_images(dataset):
    """Every other image flipped left-right with its pose unchanged: a flip augmentation that forgets to
    mirror the label (a mirrored object needs a reflected pose, which no rotation is)."""

    def fn(i, item):
        if i % 2:
            item["image"] = item["image"].flip(-1)
        return item

    return Mapped(dataset, fn=fn)


def quaternion_order(dataset):
    """A training set joined from two recordings whose rotations are stored as quaternions in different orders:
    the second half's w,x,y,z read as x,y,z,w (roma's order), so its rotation labels are other rotations; the
    translations are right."""
    half = len(dataset) // 2

    def fn(i, item):
        if i >= half:
            q = roma.rotmat_to_unitquat(item["R"])  # x, y, z, w
            item["R"] = roma.unitquat_to_rotmat(q.roll(1, -1))  # its w, x, y, z taken for x, y, z, w
        return item

    return Mapped(dataset, fn=fn)


def labels_turned_back(augment):
    """The in-plane rotation augmentation with a sign error: each image turned by Q about the camera axis and
    its pose by Q's inverse (R' = Q^T R, t' = Q^T t), as when the image warp and the pose update disagree on
    which way a positive angle turns. Q is read back from the correct augmentation's output."""

    def fn(batch):
        out = augment(batch)
        back = batch["R"] @ out["R"].transpose(-1, -2)  # (Q R)^T = R^T Q^T, so R (Q R)^T = Q^T
        return out | {"R": back @ batch["R"], "t": (back @ batch["t"].unsqueeze(-1)).squeeze(-1)}

    return fn


def turned_in_object_frame(augment):
    """The in-plane rotation augmentation with the turn multiplied on the wrong side: each image turned by Q
    about the camera axis, its orientation set to R Q (a turn about the object's own axis) instead of Q R; the
    translation is turned right (t' = Q t). Q is read back from the correct augmentation's output."""

    def fn(batch):
        out = augment(batch)
        turn = out["R"] @ batch["R"].transpose(-1, -2)  # (Q R) R^T = Q
        return out | {"R": batch["R"] @ turn}

    return fn


def translation_left_unturned(augment):
    """The in-plane rotation augmentation with the translation's update forgotten: each image turned by Q about
    the camera axis, its orientation turned with it (Q R), its translation returned as it was (t, not Q t), so
    the label puts the object where it was before the turn."""

    def fn(batch):
        return augment(batch) | {"t": batch["t"]}

    return fn


AUGMENT_FAULTS = {
    "labels_turned_back": labels_turned_back,
    "turned_in_object_frame": turned_in_object_frame,
    "translation_left_unturned": translation_left_unturned,
}


def centimetre_recording(dataset):
    """A training set joined from three recordings, the last of which stores its translations in centimetres
    where the others (and the loader) use millimetres: the last third's translations read 10x too small; the
    rotations are right."""
    start = len(dataset) - len(dataset) // 3

    def fn(i, item):
        if i >= start:
            item["t"] = item["t"] / 10.0
        return item

    return Mapped(dataset, fn=fn)


def dropped_frame(dataset):
    """A recording whose image list lost one frame 40 % of the way through (a corrupt file skipped on export)
    while its label file kept every row, joined by row: the images before the drop keep their poses, every
    image after it carries the pose of the frame before it, and the last label has no image."""
    targets = _targets(dataset)
    drop = int(0.4 * len(dataset))

    def fn(i, item):
        item["R"], item["t"] = targets[i]
        return item

    return Mapped(dataset, index=[*range(drop), *range(drop + 1, len(dataset))], fn=fn)


def fault_augment(cfg, augment):
    """The training batches' augmentation (batch -> batch, or None), broken when a fault is in it."""
    fault = AUGMENT_FAULTS.get(fault_of(cfg))
    return fault(augment) if fault and augment is not None else augment


def fault_datasets(cfg, train_set, val_set):
    fault = fault_of(cfg)
    size = int(cfg.debugging.get("fault_size", 12) or 12) if fault else 0
    seed = int(cfg.get("seed", 0))
    if fault == "shuffled_targets":
        return shuffled_targets(train_set, seed), shuffled_targets(val_set, seed + 1)
    if fault == "shifted_targets":
        return shifted_targets(train_set), shifted_targets(val_set)
    if fault == "foreign_labels":
        return foreign_labels(train_set, seed), foreign_labels(val_set, seed + 1)
    if fault == "val_in_train":
        picks = np.random.default_rng(seed).choice(
            len(train_set), size=min(len(val_set), len(train_set)), replace=False
        )
        return train_set, Mapped(train_set, index=picks)
    if fault == "sorted_by_target":
        return sorted_by_target(train_set), val_set
    if fault == "sorted_by_tilt":
        return sorted_by_tilt(train_set), val_set
    if fault == "mirrored_images":
        return mirrored_images(train_set), val_set
    if fault == "quaternion_order":
        return quaternion_order(train_set), val_set
    if fault == "centimetre_recording":
        return centimetre_recording(train_set), val_set
    if fault == "dropped_frame":
        return dropped_frame(train_set), val_set
    if fault == "tiny_val":
        return train_set, Mapped(val_set, index=range(min(size, len(val_set))))
    return train_set, val_set


def _mix_batch(module, args):
    # The classic view bug: a [B, C, H, W] batch reshaped as if it were [C, B, H, W] and transposed back,
    # so sample i's channels come from other samples.
    (images, *rest) = args
    b, c, h, w = images.shape
    return (images.reshape(c, b, h, w).transpose(0, 1).contiguous(), *rest)


def _zero_input(module, args):
    (images, *rest) = args
    return (torch.zeros_like(images), *rest)


def _detach_last_output(module, args, out):
    # A slip such as `trans = out["trans"].detach()` (meant for logging) before the loss: the forward pass and
    # the predictions are unchanged, but no gradient reaches what computes that output.
    if isinstance(out, dict) and len(out) > 1:
        last = list(out)[-1]
        return out | {last: out[last].detach()}
    return out


def _clamp_outputs(module, args, out):
    # `return F.relu(self.head(x))`: an activation copied onto the output layer. Every negative target
    # component (half of a rotation's, the left/upper offsets) is out of reach, and an output pushed below zero
    # passes no gradient (a dead ReLU): on the pose example training stops within the first steps.
    if isinstance(out, dict):
        return {k: torch.relu(v) for k, v in out.items()}
    return torch.relu(out)


def _round_last_output(module, args, out):
    # `torch.round(t, decimals=2)` added to make logged predictions readable and left in forward: the values
    # barely change, but the gradient of round is zero everywhere, so what computes that output never trains.
    if isinstance(out, dict):
        last = list(out)[-1]
        return out | {last: torch.round(out[last], decimals=2)}
    return torch.round(out, decimals=2)


def fault_model(cfg, model):
    """Code faults as forward pre-hooks, so the model's state_dict and checkpoints stay unchanged."""
    fault = fault_of(cfg)
    if fault == "batch_mixing":
        model.register_forward_pre_hook(_mix_batch)
    elif fault == "ignores_input":
        model.register_forward_pre_hook(_zero_input)
    elif fault == "detached_output":
        model.register_forward_hook(_detach_last_output)
    elif fault == "clamped_output":
        model.register_forward_hook(_clamp_outputs)
    elif fault == "rounded_output":
        model.register_forward_hook(_round_last_output)
    elif fault == "frozen_convs":
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.requires_grad_(False)
    return model


def fault_loss(cfg, criterion):
    """Code faults in the loss: a wrapper around `criterion(out, batch)` (the criterion itself for the others)."""
    fault = fault_of(cfg)
    if fault == "broadcast_target":

        def first_target_for_all(out, batch):
            # `t_gt = batch["t"][:1]` where `batch["t"]` was meant: [1, 3] broadcasts against [B, 3], no error
            return criterion(out, batch | {"t": batch["t"][:1].expand_as(batch["t"])})

        return first_target_for_all
    if fault == "rolled_target":

        def previous_rotation(out, batch):
            # `R_gt = batch["R"].roll(1, 0)`, a next-frame target left over from a sequence model
            return criterion(out, batch | {"R": batch["R"].roll(1, 0)})

        return previous_rotation
    return criterion
