"""Reader for any dataset in the BOP format (https://github.com/thodan/bop_toolkit/blob/master/docs/bop_datasets_format.md).

The synthetic capture writes this format and real downloads (LINEMOD, LM-O, YCB-V, T-LESS, ...) use it,
so `data=bop data.root=/path/to/lm data.obj_id=1 data.splits.train=train_pbr` trains on real data with
no code change. Layout read here:

    root/models/models_info.json, obj_000001.ply, ...       (mm)
    root/<split>/<scene 000000>/rgb|gray/<im 000000>.png|.jpg
    root/<split>/<scene>/scene_gt.json       {im_id: [{cam_R_m2c: 9 row-major, cam_t_m2c: 3 mm, obj_id}]}
    root/<split>/<scene>/scene_camera.json   {im_id: {cam_K: 9 row-major, depth_scale}}
    root/<split>/<scene>/scene_gt_info.json  {im_id: [{visib_fract, bbox_visib, ...}]}  (optional)

One item = one annotated instance of `obj_id` (an image showing it twice gives two items), as a square
`image_size` x `image_size` input with the K of that input. Two ways to get there (`data.input`):
`crop` cuts a zoomed-in square around the instance's box out of the frame (data/crop.py: real frames
with several small objects; poses stay in the frame's camera), `frame` resizes the whole frame (the
object-centred synthetic images; a 640x480 frame is squashed, K scaled per axis so projection stays
exact). Object models: data/models.py. Anything malformed raises `BopFormatError` naming the file.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from . import crop as crops
from .models import (  # noqa: F401 (the models API is also bop's: bop.read_ply, bop.load_models_info, ...)
    BopFormatError,
    is_symmetric,
    load_model,
    load_model_points,
    load_models_info,
    model_path,
    read_json,
    read_ply,
    sample_surface,
)
from .models import key as _key
from .models import numbers as _numbers

INPUT_MODES = ("crop", "frame")
BOX_KINDS = ("visib", "obj")


# --- scenes -----------------------------------------------------------------------------------------------


def split_scenes(root, split):
    """Scene folders of a split, sorted (folders named by an integer scene id)."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise BopFormatError(f"{split_dir}: split folder is missing")
    scenes = sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not scenes:
        raise BopFormatError(f"{split_dir}: no scene folders (expected e.g. {split_dir / '000000'})")
    return scenes


def _image_files(scene_dir):
    """{im_id: path} of the scene's images (rgb/ or, for gray datasets such as ITODD, gray/)."""
    for sub in ("rgb", "gray"):
        folder = scene_dir / sub
        if folder.is_dir():
            return {
                int(p.stem): p
                for p in folder.iterdir()
                if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif") and p.stem.isdigit()
            }
    raise BopFormatError(f"{scene_dir}: has neither rgb/ nor gray/ images")


def read_scene(scene_dir):
    """Validated annotations of one scene: (scene_gt, scene_camera, scene_gt_info or None), keyed by int im_id.

    scene_gt[im] = list of dicts with R (3,3), t (3,) mm, obj_id; scene_camera[im] = dict with K (3,3), depth_scale.
    """
    scene_dir = Path(scene_dir)
    gt_path, cam_path, info_path = (
        scene_dir / f for f in ("scene_gt.json", "scene_camera.json", "scene_gt_info.json")
    )
    gt_raw, cam_raw = read_json(gt_path), read_json(cam_path)
    info_raw = read_json(info_path) if info_path.exists() else None
    for path, raw in ((gt_path, gt_raw), (cam_path, cam_raw), (info_path, info_raw)):
        if raw is not None and not isinstance(raw, dict):
            raise BopFormatError(f"{path}: expected an object keyed by image id")
    scene_gt, scene_camera, scene_info = {}, {}, ({} if info_raw is not None else None)
    for key, cam in cam_raw.items():
        K = _numbers(_key(cam, "cam_K", cam_path, f"image {key}"), 9, cam_path, f"{key}.cam_K").reshape(3, 3)
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise BopFormatError(f"{cam_path}: image {key} cam_K has non-positive focal length")
        depth_scale = float(cam.get("depth_scale", 1.0))
        scene_camera[int(key)] = {"K": K, "depth_scale": depth_scale}
    for key, instances in gt_raw.items():
        im_id = int(key)
        if im_id not in scene_camera:
            raise BopFormatError(f"{cam_path}: no camera for image {key} annotated in {gt_path.name}")
        if not isinstance(instances, list):
            raise BopFormatError(f"{gt_path}: image {key} should map to a list of instances")
        records = []
        for gt_id, inst in enumerate(instances):
            where = f"image {key} instance {gt_id}"
            R = _numbers(_key(inst, "cam_R_m2c", gt_path, where), 9, gt_path, f"{where} cam_R_m2c").reshape(
                3, 3
            )
            t = _numbers(_key(inst, "cam_t_m2c", gt_path, where), 3, gt_path, f"{where} cam_t_m2c")
            obj_id = int(_key(inst, "obj_id", gt_path, where))
            records.append({"R": R, "t": t, "obj_id": obj_id})
        scene_gt[im_id] = records
        if info_raw is not None:
            infos = info_raw.get(key)
            if not isinstance(infos, list) or len(infos) != len(records):
                raise BopFormatError(f"{info_path}: image {key} should list {len(records)} instances")
            scene_info[im_id] = infos
    return scene_gt, scene_camera, scene_info


def _check_units(scene_dir, gt_path, records, diameter):
    """Catch translations in metres (or cm): a camera closer to the object centre than its radius is
    impossible, and for BOP-sized objects a metre-valued |t| is always below that."""
    for im_id, gt_id, rec in records:
        dist = float(np.linalg.norm(rec["t"]))
        if dist < diameter / 2:
            raise BopFormatError(
                f"{gt_path}: image {im_id} instance {gt_id}: |cam_t_m2c| = {dist:.4g} is smaller than the object "
                f"radius ({diameter / 2:.4g} mm); translations must be in mm (metres given?)"
            )


def _check_depth(scene_dir, depth_path, mask_path, rec, depth_scale):
    """Compare the depth image inside the instance mask with the pose: catches a wrong depth_scale or units."""
    depth = np.asarray(Image.open(depth_path), dtype=np.float64) * depth_scale
    mask = np.asarray(Image.open(mask_path)) > 0
    valid = mask & (depth > 0)
    if valid.sum() < 10:
        return
    median = float(np.median(depth[valid]))
    t_z = float(rec["t"][2])
    if not (0.5 * t_z < median < 2.0 * t_z):
        raise BopFormatError(
            f"{depth_path}: median depth in the mask is {median:.4g} mm but cam_t_m2c z is {t_z:.4g} mm "
            "(depth_scale wrong, or translations not in mm?)"
        )


class BopDataset(torch.utils.data.Dataset):
    """Instances of one object in one split of a BOP dataset; see the module docstring.

    Item: image float32 3xSxS in [0,1] (S = image_size), K float32 3x3 of that image, R float32 3x3 (model
    to camera), t float32 (3,) mm, K_frame float32 3x3 of the file's frame (R and t are in its camera),
    window float32 (3,) the crop (cx, cy, side) in frame pixels (the whole frame in frame mode), obj_id,
    scene_id, im_id, gt_id (ints), visib_fract (float, 1.0 without scene_gt_info.json), rgb_path (str).

    `crop=None` resizes whole frames to image_size (K scaled per axis: exact, but a 640x480 frame is
    squashed). `crop=dict(pad, box, shift, scale, detections, min_score, match_iou)` cuts a square window
    of pad x the object's box (`box`: scene_gt_info's bbox_visib or bbox_obj, else the projected model)
    out of the frame (data/crop.py), jittered by shift/scale (CDPN's dynamic zoom-in; 0 = none); with a
    `detections` file the box is the detection of the object overlapping the true box most (IoU >=
    match_iou), instances without one are left out and listed in `missed`.

    preload=True decodes every image once into one uint8 tensor (resized frames, or whole frames in crop
    mode), so a DataLoader serves items at memory speed. min_visib_fract drops heavily occluded instances.
    """

    def __init__(
        self, root, split, obj_id, image_size=None, preload=False, min_visib_fract=0.0, check_depth=True,
        crop=None,
    ):  # fmt: skip
        self.root, self.split, self.obj_id = Path(root), split, int(obj_id)
        self.image_size = int(image_size) if image_size else None
        self.crop = self._check_crop(crop)
        infos = load_models_info(self.root)
        if self.obj_id not in infos:
            raise BopFormatError(
                f"{self.root / 'models' / 'models_info.json'}: no object {self.obj_id} (has {sorted(infos)})"
            )
        self.diameter = infos[self.obj_id]["diameter"]
        self._points = None  # model vertices, loaded when a box must be computed from the pose
        self.detections = None
        if self.crop and self.crop.get("detections"):
            self.detections = crops.load_detections(self.crop["detections"], self.crop.get("min_score", 0.0))
        self.missed = []  # (scene_id, im_id, gt_id) without a matching detection
        self.items = []  # (scene_id, im_id, gt_id, path, K, R, t, visib_fract, bbox)
        for scene_dir in split_scenes(self.root, split):
            self._add_scene(scene_dir, min_visib_fract, check_depth)
        if not self.items:
            raise BopFormatError(f"{self.root / split}: no instances of obj_id {self.obj_id}")
        self.images = None
        self.K_frame = torch.as_tensor(np.stack([item[4] for item in self.items]), dtype=torch.float32)
        self.K = self.K_frame.clone()
        self.frame = None  # item -> its frame in self.images, when preloaded
        if preload:
            self._preload()
        # labels as float32 tensors once, so an item is a few indexing operations
        self.R = torch.as_tensor(np.stack([item[5] for item in self.items]), dtype=torch.float32)
        self.t = torch.as_tensor(np.stack([item[6] for item in self.items]), dtype=torch.float32)

    def _check_crop(self, crop):
        if not crop:
            return None
        crop = dict(crop)
        if not self.image_size:
            raise ValueError("BopDataset: crop mode needs image_size (the side of the square crops)")
        if crop.get("box", "visib") not in BOX_KINDS:
            raise ValueError(f"data.crop.box={crop.get('box')!r}: expected one of {BOX_KINDS}")
        if not float(crop.get("pad", 1.5)) > 0:
            raise ValueError(f"data.crop.pad={crop.get('pad')!r}: expected a number > 0 (window / box side)")
        for name in ("shift", "scale"):
            if not 0 <= float(crop.get(name) or 0) < 1:
                raise ValueError(f"data.crop.jitter.{name}={crop.get(name)!r}: expected 0 <= value < 1")
        return crop

    def _box(self, info, rec, K):
        """The instance's box [x, y, w, h] for cropping: scene_gt_info's, else the projected model's."""
        name = f"bbox_{self.crop.get('box', 'visib')}"
        if info is not None and name in info:
            return np.asarray(info[name], dtype=np.float64)
        if self._points is None:
            self._points = load_model_points(self.root, self.obj_id)
        cam = self._points @ rec["R"].T + rec["t"]
        uv = cam @ K.T
        uv = uv[:, :2] / uv[:, 2:3]
        low, high = np.floor(uv.min(0) + 0.5), np.floor(uv.max(0) + 0.5)
        return np.array([low[0], low[1], high[0] - low[0] + 1, high[1] - low[1] + 1])

    def _add_scene(self, scene_dir, min_visib_fract, check_depth):
        scene_id = int(scene_dir.name)
        scene_gt, scene_camera, scene_info = read_scene(scene_dir)
        files = _image_files(scene_dir)
        ours = []
        for im_id in sorted(scene_gt):
            for gt_id, rec in enumerate(scene_gt[im_id]):
                if rec["obj_id"] != self.obj_id:
                    continue
                visib = 1.0
                if scene_info is not None:
                    visib = float(scene_info[im_id][gt_id].get("visib_fract", 1.0))
                if visib < min_visib_fract:
                    continue
                if im_id not in files:
                    raise BopFormatError(f"{scene_dir / 'rgb' / f'{im_id:06d}.png'}: image is missing")
                ours.append((im_id, gt_id, rec))
        if not ours:
            return
        _check_units(scene_dir, scene_dir / "scene_gt.json", ours, self.diameter)
        if check_depth:
            im_id, gt_id, rec = ours[0]
            depth_path = scene_dir / "depth" / f"{im_id:06d}.png"
            mask_path = scene_dir / "mask_visib" / f"{im_id:06d}_{gt_id:06d}.png"
            if depth_path.exists() and mask_path.exists():
                _check_depth(scene_dir, depth_path, mask_path, rec, scene_camera[im_id]["depth_scale"])
        for im_id, gt_id, rec in ours:
            info = scene_info[im_id][gt_id] if scene_info is not None else None
            visib = float(info.get("visib_fract", 1.0)) if info is not None else 1.0
            K = scene_camera[im_id]["K"]
            bbox = None
            if self.crop:
                bbox = self._box(info, rec, K)
                if bbox[2] <= 0 or bbox[3] <= 0:  # not in view (BOP writes [-1, -1, 0, 0])
                    continue
                if self.detections is not None:
                    candidates = self.detections.get((scene_id, im_id, self.obj_id), [])
                    bbox = crops.match_detection(candidates, bbox, float(self.crop.get("match_iou", 0.0)))
                    if bbox is None:
                        self.missed.append((scene_id, im_id, gt_id))
                        continue
            item = (scene_id, im_id, gt_id, str(files[im_id]), K, rec["R"], rec["t"], visib, bbox)
            self.items.append(item)

    def _preload(self):
        """Decode each frame once (a frame holding the object twice is one frame) into one preallocated
        uint8 tensor: 16,000 crops of 7,400 640x480 frames take 6.8 GB, not 15 GB per instance and twice
        that while stacking."""
        first = {}  # image path -> (frame number, its first item)
        for i, item in enumerate(self.items):
            first.setdefault(item[3], (len(first), i))
        self.frame = torch.as_tensor([first[item[3]][0] for item in self.items])
        frame_K = []
        for n, (path, (_, i)) in enumerate(first.items()):
            image, K = self._decode(i)
            if self.images is None:
                self.images = torch.empty((len(first), *image.shape), dtype=image.dtype)
            elif image.shape != self.images.shape[1:]:
                raise BopFormatError(f"{path}: images differ in size; set image_size to preload")
            self.images[n] = image
            frame_K.append(K)
        self.K = torch.as_tensor(np.stack(frame_K), dtype=torch.float32)[self.frame]

    def _read(self, index):
        path = self.items[index][3]
        try:
            with Image.open(path) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        except OSError as e:
            raise BopFormatError(f"{path}: unreadable image ({e})") from e

    def _decode(self, index):
        """(uint8 3xHxW image, its K): the frame resized to image_size, or the whole frame in crop mode."""
        image, K = self._read(index), self.items[index][4]
        return (image, K.copy()) if self.crop else self._resize(image, K)

    def _resize(self, image, K):
        K = K.copy()
        h, w = image.shape[-2:]
        size = self.image_size
        if size and (h, w) != (size, size):
            image = TF.resize(image, [size, size], antialias=True)
            sx, sy = size / w, size / h
            # Pixel centres sit at integer coordinates (BOP/OpenCV), so the scaling pivots on -0.5.
            K[0, 0], K[0, 2] = K[0, 0] * sx, (K[0, 2] + 0.5) * sx - 0.5
            K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
        return image, K

    def window(self, index):
        """The crop window (cx, cy, side) of item `index`: jittered anew on every call when jitter is on."""
        bbox, c = self.items[index][8], self.crop
        if c.get("shift") or c.get("scale"):
            return crops.jitter_window(bbox, float(c.get("pad", 1.5)), float(c.get("shift") or 0),
                                       float(c.get("scale") or 0))  # fmt: skip
        return crops.box_window(bbox, float(c.get("pad", 1.5)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        scene_id, im_id, gt_id, path, _, _, _, visib, _ = self.items[index]
        if self.images is not None:
            image, K = self.images[self.frame[index]], self.K[index]  # K was scaled when preloading
        else:
            image, K = self._decode(index)
            K = torch.as_tensor(K, dtype=torch.float32)
        K_frame = self.K_frame[index]
        if self.crop:
            window = self.window(index)
            image = crops.crop_image(image, window, self.image_size).div_(255.0)
            K = crops.crop_intrinsics(K_frame.double(), window, self.image_size).float()
            window = torch.tensor(window, dtype=torch.float32)
        else:
            h, w = self.images.shape[-2:] if self.images is not None else image.shape[-2:]
            image = image.float().div_(255.0)
            window = torch.tensor([(w - 1) / 2, (h - 1) / 2, max(w, h)], dtype=torch.float32)
        return {
            "image": image,
            "K": K.clone(),
            "R": self.R[index].clone(),
            "t": self.t[index].clone(),
            "K_frame": K_frame.clone(),
            "window": window,
            "obj_id": self.obj_id,
            "scene_id": scene_id,
            "im_id": im_id,
            "gt_id": gt_id,
            "visib_fract": visib,
            "rgb_path": path,
        }


def dataset_from_config(data, split, role="train", trained=None):
    """The BopDataset of `split` as `data` (cfg.data) configures it, for `role` train (jittered crops),
    val (plain crops) or test (plain crops, or the boxes of data.crop.detections). `trained` (the data
    config a checkpoint was trained with) fixes the input: image_size, data.input and the crop's pad."""
    net = trained if trained is not None else data
    mode = net.get("input", "frame")
    if mode not in INPUT_MODES:
        raise ValueError(f"data.input={mode!r}: expected one of {INPUT_MODES}")
    crop = None
    if mode == "crop":
        c, c_net = data.get("crop") or {}, net.get("crop") or {}
        jitter = (c.get("jitter") or {}) if role == "train" else {}
        crop = {
            "pad": float(c_net.get("pad", 1.5)),
            "box": c.get("box", "visib"),
            "shift": float(jitter.get("shift", 0.0)),
            "scale": float(jitter.get("scale", 0.0)),
            "detections": c.get("detections") if role == "test" else None,
            "min_score": float(c.get("min_score", 0.0)),
            "match_iou": float(c.get("match_iou", 0.0)),
        }
    return BopDataset(
        data.root, split, data.obj_id, image_size=net.get("image_size"), preload=data.get("preload", False),
        min_visib_fract=data.get("min_visib_fract", 0.0), crop=crop,
    )  # fmt: skip
