"""Reader for any dataset in the BOP format (https://github.com/thodan/bop_toolkit/blob/master/docs/bop_datasets_format.md).

The synthetic capture writes this format and real downloads (LINEMOD, LM-O, YCB-V, T-LESS, ...) use it,
so `data=bop data.root=/path/to/lm data.obj_id=1 data.splits.train=train_pbr` trains on real data with
no code change. Layout read here:

    root/models/models_info.json, obj_000001.ply, ...       (mm)
    root/<split>/<scene 000000>/rgb|gray/<im 000000>.png|.jpg
    root/<split>/<scene>/scene_gt.json       {im_id: [{cam_R_m2c: 9 row-major, cam_t_m2c: 3 mm, obj_id}]}
    root/<split>/<scene>/scene_camera.json   {im_id: {cam_K: 9 row-major, depth_scale}}
    root/<split>/<scene>/scene_gt_info.json  {im_id: [{visib_fract, bbox_visib, ...}]}  (optional)

One item = one annotated instance of `obj_id` (an image showing it twice gives two items). Images are
resized whole to `image_size` x `image_size` without cropping (the aspect ratio of a 640x480 real image
changes; K is scaled per axis, so projection stays exact). Anything malformed raises `BopFormatError`
naming the file and the problem.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF


class BopFormatError(ValueError):
    """A BOP dataset file is missing, unreadable or inconsistent; the message names the file."""


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise BopFormatError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BopFormatError(f"{path}: malformed JSON ({e})") from e


def _numbers(value, n, path, where):
    """`value` as a float64 array of `n` finite numbers, else a BopFormatError naming path and key."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise BopFormatError(f"{path}: {where} is not a list of numbers") from e
    if arr.size != n:
        raise BopFormatError(f"{path}: {where} has {arr.size} numbers, expected {n}")
    if not np.all(np.isfinite(arr)):
        raise BopFormatError(f"{path}: {where} contains NaN or inf")
    return arr


def _key(record, key, path, where):
    if not isinstance(record, dict) or key not in record:
        raise BopFormatError(f"{path}: {where} has no '{key}'")
    return record[key]


# --- object models ----------------------------------------------------------------------------------------


def model_path(root, obj_id):
    return Path(root) / "models" / f"obj_{int(obj_id):06d}.ply"


def load_models_info(root):
    """{obj_id: info} from models/models_info.json (diameter and extents in mm, BOP symmetry lists)."""
    path = Path(root) / "models" / "models_info.json"
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise BopFormatError(f"{path}: expected a non-empty object {{obj_id: info}}")
    infos = {}
    for key, info in raw.items():
        try:
            obj_id = int(key)
        except ValueError as e:
            raise BopFormatError(f"{path}: key '{key}' is not an integer object id") from e
        diameter = float(
            _numbers(_key(info, "diameter", path, f"object {key}"), 1, path, f"{key}.diameter")[0]
        )
        if diameter <= 0:
            raise BopFormatError(f"{path}: object {key} has diameter {diameter}, expected > 0 (mm)")
        info = dict(info, diameter=diameter)
        info.setdefault("symmetries_discrete", [])
        info.setdefault("symmetries_continuous", [])
        for i, sym in enumerate(info["symmetries_discrete"]):
            _numbers(sym, 16, path, f"{key}.symmetries_discrete[{i}]")
        for i, sym in enumerate(info["symmetries_continuous"]):
            _numbers(_key(sym, "axis", path, f"{key}.symmetries_continuous[{i}]"), 3, path, "axis")
            _numbers(_key(sym, "offset", path, f"{key}.symmetries_continuous[{i}]"), 3, path, "offset")
        infos[obj_id] = info
    return infos


def is_symmetric(info):
    """True when the model declares any discrete or continuous symmetry (use ADD-S, not ADD)."""
    return bool(info.get("symmetries_discrete")) or bool(info.get("symmetries_continuous"))


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def _binary_lists(data, pos, count, props, order):
    """Rows of a binary PLY element that has list properties: ({property: array or list of lists}, end)."""
    if len(props) == 1 and count:
        # The usual face element, one list: read it as one array when every polygon has the same size.
        p, (_, len_t, item_t) = props[0]
        k = int(np.frombuffer(data, dtype=order + len_t, count=1, offset=pos)[0])
        record = np.dtype([("n", order + len_t), ("v", order + item_t, (k,))])
        if len(data) >= pos + record.itemsize * count:
            table = np.frombuffer(data, dtype=record, count=count, offset=pos)
            if np.all(table["n"] == k):
                return {p: table["v"]}, pos + record.itemsize * count
    columns = {p: [] for p, _ in props}
    for _ in range(count):
        for p, t in props:
            if isinstance(t, tuple):
                _, len_t, item_t = t
                n = int(np.frombuffer(data, dtype=order + len_t, count=1, offset=pos)[0])
                pos += np.dtype(len_t).itemsize
                columns[p].append(np.frombuffer(data, dtype=order + item_t, count=n, offset=pos).tolist())
                pos += np.dtype(item_t).itemsize * n
            else:
                columns[p].append(np.frombuffer(data, dtype=order + t, count=1, offset=pos)[0])
                pos += np.dtype(t).itemsize
    return columns, pos


def read_ply(path):
    """Vertices (N,3) float64, faces (F,3) int64 (triangles only) and vertex colours (N,3) uint8 or None.

    Written by hand because no project dependency reads PLY as arrays (mitsuba's loader builds a render
    mesh). Handles ascii and binary PLY as written by BOP models, meshlab and the capture assets.
    """
    path = Path(path)
    if not path.is_file():
        raise BopFormatError(f"{path}: model file is missing")
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise BopFormatError(f"{path}: not a PLY file (no 'ply' magic / 'end_header')")
    body_start = data.index(b"\n", end) + 1
    elements, fmt = [], None
    for line in data[:end].decode("ascii", "replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts[0] == "property" and elements:
            if parts[1] == "list":
                elements[-1][2].append((parts[4], ("list", _PLY_TYPES[parts[2]], _PLY_TYPES[parts[3]])))
            else:
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise BopFormatError(f"{path}: unsupported PLY format {fmt!r}")
    parsed = {}
    try:
        if fmt == "ascii":
            tokens = data[body_start:].split()
            pos = 0
            for name, count, props in elements:
                if all(not isinstance(t, tuple) for _, t in props):
                    n = len(props)
                    table = np.array(tokens[pos : pos + n * count], dtype=np.float64).reshape(count, n)
                    parsed[name] = {p: table[:, i] for i, (p, _) in enumerate(props)}
                    pos += n * count
                else:
                    rows = []
                    for _ in range(count):
                        row = {}
                        for p, t in props:
                            if isinstance(t, tuple):
                                k = int(tokens[pos])
                                row[p] = [float(v) for v in tokens[pos + 1 : pos + 1 + k]]
                                pos += 1 + k
                            else:
                                row[p] = float(tokens[pos])
                                pos += 1
                        rows.append(row)
                    parsed[name] = {p: [r[p] for r in rows] for p, _ in props}
        else:
            order = "<" if fmt == "binary_little_endian" else ">"
            pos = body_start
            for name, count, props in elements:
                if all(not isinstance(t, tuple) for _, t in props):
                    dtype = np.dtype([(p, order + t) for p, t in props])
                    table = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
                    pos += dtype.itemsize * count
                    parsed[name] = {p: table[p] for p, _ in props}
                else:
                    parsed[name], pos = _binary_lists(data, pos, count, props, order)
    except (ValueError, IndexError) as e:
        raise BopFormatError(f"{path}: truncated or corrupt PLY body ({e})") from e
    vertex = parsed.get("vertex")
    if vertex is None or not all(k in vertex for k in "xyz"):
        raise BopFormatError(f"{path}: PLY has no vertex x/y/z")
    vertices = np.stack([np.asarray(vertex[k], dtype=np.float64) for k in "xyz"], axis=1)
    if not np.all(np.isfinite(vertices)):
        raise BopFormatError(f"{path}: vertices contain NaN or inf")
    colors = None
    if all(k in vertex for k in ("red", "green", "blue")):
        colors = np.stack([np.asarray(vertex[k]) for k in ("red", "green", "blue")], axis=1).astype(np.uint8)
    faces = np.zeros((0, 3), dtype=np.int64)
    face = parsed.get("face") or {}
    polygons = face.get("vertex_indices", face.get("vertex_index"))
    if polygons is not None and len(polygons):
        if isinstance(polygons, np.ndarray):  # all of one size
            polygons = polygons.astype(np.int64)
            fans = [polygons[:, [0, i, i + 1]] for i in range(1, polygons.shape[1] - 1)]
        else:  # mixed sizes: triangulate each polygon as a fan
            fans = [
                np.array(
                    [[poly[0], poly[i], poly[i + 1]] for poly in polygons for i in range(1, len(poly) - 1)]
                )
            ]
        faces = np.concatenate(fans).astype(np.int64).reshape(-1, 3)
        if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
            raise BopFormatError(f"{path}: face indices out of range")
    return vertices, faces, colors


def sample_surface(vertices, faces, n, seed=0):
    """`n` points uniformly on the triangle surface (area-weighted), deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    idx = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random((2, n))
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[idx]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def load_model_points(root, obj_id, n=None):
    """Model points in mm, (N,3) float64: the PLY vertices; with `n`, exactly n of them, deterministically
    (a fixed-seed subset when the model has more vertices, vertices plus surface samples when fewer)."""
    vertices, faces, _ = read_ply(model_path(root, obj_id))
    if n is None or n == len(vertices):
        return vertices
    rng = np.random.default_rng(0)
    if n < len(vertices):
        return vertices[np.sort(rng.choice(len(vertices), size=n, replace=False))]
    if len(faces):
        return np.concatenate([vertices, sample_surface(vertices, faces, n - len(vertices))])
    return vertices[rng.choice(len(vertices), size=n, replace=True)]


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

    Item: image float32 3xHxW in [0,1], K float32 3x3 (scaled with the resize), R float32 3x3 (model to
    camera), t float32 (3,) mm, obj_id, scene_id, im_id, gt_id (ints), visib_fract (float, 1.0 when the
    dataset has no scene_gt_info.json), rgb_path (str).

    preload=True decodes (and resizes) every image once into one uint8 tensor, so a DataLoader serves
    items at memory speed; use it when the split fits in RAM (the synthetic one does: 10k x 3 x 64 x 64 =
    123 MB). min_visib_fract drops heavily occluded instances.
    """

    def __init__(
        self, root, split, obj_id, image_size=None, preload=False, min_visib_fract=0.0, check_depth=True
    ):
        self.root, self.split, self.obj_id = Path(root), split, int(obj_id)
        self.image_size = int(image_size) if image_size else None
        infos = load_models_info(self.root)
        if self.obj_id not in infos:
            raise BopFormatError(
                f"{self.root / 'models' / 'models_info.json'}: no object {self.obj_id} (has {sorted(infos)})"
            )
        self.diameter = infos[self.obj_id]["diameter"]
        self.items = []  # (scene_id, im_id, gt_id, path, K, R, t, visib_fract)
        for scene_dir in split_scenes(self.root, split):
            self._add_scene(scene_dir, min_visib_fract, check_depth)
        if not self.items:
            raise BopFormatError(f"{self.root / split}: no instances of obj_id {self.obj_id}")
        self.images = None
        if preload:
            decoded = [self._decode(i) for i in range(len(self.items))]
            if len({tuple(image.shape) for image, _ in decoded}) > 1:
                raise BopFormatError(f"{self.root / split}: images differ in size; set image_size to preload")
            self.images = torch.stack([image for image, _ in decoded])
            self.items = [
                item[:4] + (K,) + item[5:] for item, (_, K) in zip(self.items, decoded, strict=True)
            ]
        # labels as float32 tensors once, so an item is a few indexing operations
        self.R = torch.as_tensor(np.stack([item[5] for item in self.items]), dtype=torch.float32)
        self.t = torch.as_tensor(np.stack([item[6] for item in self.items]), dtype=torch.float32)
        self.K = torch.as_tensor(np.stack([item[4] for item in self.items]), dtype=torch.float32)

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
            visib = float(scene_info[im_id][gt_id].get("visib_fract", 1.0)) if scene_info is not None else 1.0
            K = scene_camera[im_id]["K"]
            self.items.append((scene_id, im_id, gt_id, str(files[im_id]), K, rec["R"], rec["t"], visib))

    def _decode(self, index):
        """(uint8 3xHxW image, K) for item `index`, resized when image_size is set."""
        path, K = self.items[index][3], self.items[index][4]
        try:
            with Image.open(path) as im:
                image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        except OSError as e:
            raise BopFormatError(f"{path}: unreadable image ({e})") from e
        return self._resize(image, K)

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

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        scene_id, im_id, gt_id, path, _, _, _, visib = self.items[index]
        if self.images is not None:
            image, K = self.images[index], self.K[index]  # K was scaled when preloading
        else:
            image, K = self._decode(index)
            K = torch.as_tensor(K, dtype=torch.float32)
        return {
            "image": image.float().div_(255.0),
            "K": K.clone(),
            "R": self.R[index].clone(),
            "t": self.t[index].clone(),
            "obj_id": self.obj_id,
            "scene_id": scene_id,
            "im_id": im_id,
            "gt_id": gt_id,
            "visib_fract": visib,
            "rgb_path": path,
        }
