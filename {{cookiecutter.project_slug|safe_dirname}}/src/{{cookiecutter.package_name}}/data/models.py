"""Object models of a BOP dataset: `models/obj_XXXXXX.ply` meshes and `models/models_info.json`.

Reads any models/ folder as BOP datasets ship it: ASCII or binary PLY (plyfile), with or without vertex
colours, normals or texture coordinates, polygons of any size (fan-triangulated). `models_info.json` may
list objects that have no PLY (LM lists 15 objects and some downloads leave meshes out): that is an
error only when such an object is used. BOP wants millimetres; a mesh whose size disagrees with its
diameter in models_info.json by a unit factor (metres, centimetres) is a `BopFormatError` naming the file.

Your own object: drop `obj_000001.ply` (mm) into `<root>/models/` and compute its models_info.json
(diameter, extents; symmetries already declared there are kept):

    python -m <package>.data.models data=bop data.root=<root>                     # mesh in mm
    python -m <package>.data.models data=bop data.root=<root> data.models.scale=1000  # metres: rewrites it in mm
"""

import contextlib
import json
import sys
from pathlib import Path

import hydra
import numpy as np
from plyfile import PlyData, PlyElement, PlyParseError
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from ..files import atomic_path, write_json
from ..paths import CONFIG_DIR


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


def numbers(value, n, path, where):
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


def key(record, name, path, where):
    if not isinstance(record, dict) or name not in record:
        raise BopFormatError(f"{path}: {where} has no '{name}'")
    return record[name]


def model_path(root, obj_id):
    return Path(root) / "models" / f"obj_{int(obj_id):06d}.ply"


def load_models_info(root):
    """{obj_id: info} from models/models_info.json (diameter and extents in mm, BOP symmetry lists)."""
    path = Path(root) / "models" / "models_info.json"
    if not path.is_file() and path.parent.is_dir():
        raise BopFormatError(
            f"{path}: file is missing; compute it from the meshes with `python -m {__name__} data=bop "
            f"data.root={root}` (symmetries are then yours to declare in it)"
        )
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise BopFormatError(f"{path}: expected a non-empty object {{obj_id: info}}")
    infos = {}
    for name, info in raw.items():
        try:
            obj_id = int(name)
        except ValueError as e:
            raise BopFormatError(f"{path}: key '{name}' is not an integer object id") from e
        diameter = float(
            numbers(key(info, "diameter", path, f"object {name}"), 1, path, f"{name}.diameter")[0]
        )
        if diameter <= 0:
            raise BopFormatError(f"{path}: object {name} has diameter {diameter}, expected > 0 (mm)")
        info = dict(info, diameter=diameter)
        info.setdefault("symmetries_discrete", [])
        info.setdefault("symmetries_continuous", [])
        for i, sym in enumerate(info["symmetries_discrete"]):
            numbers(sym, 16, path, f"{name}.symmetries_discrete[{i}]")
        for i, sym in enumerate(info["symmetries_continuous"]):
            numbers(key(sym, "axis", path, f"{name}.symmetries_continuous[{i}]"), 3, path, "axis")
            numbers(key(sym, "offset", path, f"{name}.symmetries_continuous[{i}]"), 3, path, "offset")
        infos[obj_id] = info
    return infos


def is_symmetric(info):
    """True when the model declares any discrete or continuous symmetry (use ADD-S, not ADD)."""
    return bool(info.get("symmetries_discrete")) or bool(info.get("symmetries_continuous"))


def read_ply(path):
    """Vertices (N,3) float64, faces (F,3) int64 (polygons fan-triangulated) and vertex colours (N,3) uint8
    or None, from an ASCII or binary PLY; normals, texture coordinates and other properties are ignored."""
    path = Path(path)
    if not path.is_file():
        raise BopFormatError(f"{path}: model file is missing")
    with open(path, "rb") as f:
        if f.read(3) != b"ply":
            raise BopFormatError(f"{path}: not a PLY file (no 'ply' magic)")
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, IndexError, EOFError, UnicodeDecodeError) as e:
        raise BopFormatError(f"{path}: unreadable PLY ({e})") from e
    names = [element.name for element in ply.elements]
    if "vertex" not in names or not all(k in ply["vertex"].data.dtype.names for k in "xyz"):
        raise BopFormatError(f"{path}: PLY has no vertex x/y/z")
    vertex = ply["vertex"].data
    vertices = np.stack([np.asarray(vertex[k], dtype=np.float64) for k in "xyz"], axis=1)
    if not np.all(np.isfinite(vertices)):
        raise BopFormatError(f"{path}: vertices contain NaN or inf")
    colors = None
    if all(k in vertex.dtype.names for k in ("red", "green", "blue")):
        colors = np.stack([vertex[k] for k in ("red", "green", "blue")], axis=1).astype(np.uint8)
    faces = np.zeros((0, 3), dtype=np.int64)
    if "face" in names:
        face = ply["face"].data
        prop = next((p for p in ("vertex_indices", "vertex_index") if p in face.dtype.names), None)
        if prop is not None and len(face):
            polygons = face[prop]
            triangles = [
                (poly[0], poly[i], poly[i + 1]) for poly in polygons for i in range(1, len(poly) - 1)
            ]
            faces = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
            if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
                raise BopFormatError(f"{path}: face indices out of range")
    return vertices, faces, colors


def diameter_mm(vertices):
    """The largest distance between two vertices (BOP's `diameter`), over the convex hull's vertices."""
    points = np.asarray(vertices, dtype=np.float64)
    if len(points) > 4:
        with contextlib.suppress(QhullError):  # flat or degenerate: all vertices
            points = points[ConvexHull(points).vertices]
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def check_units(path, vertices, diameter, info_path):
    """BopFormatError when the mesh's size disagrees with models_info's diameter (mm) by a unit factor."""
    diagonal = float(np.linalg.norm(vertices.max(0) - vertices.min(0)))
    # the diameter lies between the largest extent and the bounding-box diagonal (>= diagonal / sqrt 3)
    if not diagonal / 3 <= diameter <= diagonal * 3:
        hint = "in metres (BOP wants mm)?" if diameter > diagonal else "and models_info.json in other units?"
        raise BopFormatError(
            f"{path}: the mesh spans {diagonal:.4g} units (bounding-box diagonal) but {info_path} gives a "
            f"diameter of {diameter:.4g} mm: is the mesh {hint} Rewrite it in mm with "
            f"`python -m {__name__} data.root=... data.models.scale=1000` (scale = mm per mesh unit)"
        )


def load_model(root, obj_id):
    """(vertices mm, faces, colours) of object `obj_id`, its units checked against models_info.json."""
    path = model_path(root, obj_id)
    infos = load_models_info(root)
    if not path.is_file():
        listed = (
            "listed in models_info.json but" if int(obj_id) in infos else "not even in models_info.json and"
        )
        raise BopFormatError(f"{path}: object {int(obj_id)} is {listed} has no model file")
    vertices, faces, colors = read_ply(path)
    if int(obj_id) in infos:
        check_units(path, vertices, infos[int(obj_id)]["diameter"], path.parent / "models_info.json")
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
    vertices, faces, _ = load_model(root, obj_id)
    if n is None or n == len(vertices):
        return vertices
    rng = np.random.default_rng(0)
    if n < len(vertices):
        return vertices[np.sort(rng.choice(len(vertices), size=n, replace=False))]
    if len(faces):
        return np.concatenate([vertices, sample_surface(vertices, faces, n - len(vertices))])
    return vertices[rng.choice(len(vertices), size=n, replace=True)]


# --- models_info.json from the meshes ------------------------------------------------------------------


def scale_ply(path, scale):
    """Rewrite a PLY with its vertex x, y, z multiplied by `scale` (same format, other properties kept)."""
    ply = PlyData.read(str(path))
    data = ply["vertex"].data.copy()
    for k in "xyz":
        data[k] = data[k] * scale
    elements = [PlyElement.describe(data, "vertex") if e.name == "vertex" else e for e in ply.elements]
    out = PlyData(elements, text=ply.text, byte_order=ply.byte_order, comments=ply.comments)
    with atomic_path(path) as tmp:
        out.write(str(tmp))


def compute_models_info(models_dir, scale=1.0):
    """Write models_dir/models_info.json from every obj_XXXXXX.ply there: diameter, min_x/y/z, size_x/y/z
    (mm); keys already in an existing models_info.json (symmetries) are kept. scale != 1 first rewrites
    each mesh multiplied by it (1000: metres to mm). A mesh under 1 mm across is refused (metres?)."""
    models_dir = Path(models_dir)
    plys = sorted(models_dir.glob("obj_*.ply"))
    if not plys:
        raise BopFormatError(f"{models_dir}: no obj_XXXXXX.ply meshes")
    info_path = models_dir / "models_info.json"
    infos = read_json(info_path) if info_path.exists() else {}
    for ply in plys:
        obj_id = int(ply.stem.split("_")[1])
        if scale != 1.0:
            scale_ply(ply, float(scale))
        vertices, _, _ = read_ply(ply)
        diameter = diameter_mm(vertices)
        if diameter < 1.0:
            raise BopFormatError(
                f"{ply}: the mesh is {diameter:.4g} units across; BOP wants mm, so this looks like metres: "
                "rerun with data.models.scale=1000 to rewrite it in mm"
            )
        low, size = vertices.min(0), vertices.max(0) - vertices.min(0)
        extents = {f"min_{a}": float(v) for a, v in zip("xyz", low, strict=True)}
        extents |= {f"size_{a}": float(v) for a, v in zip("xyz", size, strict=True)}
        infos[str(obj_id)] = dict(infos.get(str(obj_id), {}), diameter=diameter, **extents)
    write_json(info_path, infos)
    return {int(k): v for k, v in infos.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    scale = float(cfg.data.get("models", {}).get("scale", 1.0))
    try:
        infos = compute_models_info(Path(cfg.data.root) / "models", scale)
    except (BopFormatError, OSError, PlyParseError) as e:
        print(f"models: {e}", file=sys.stderr)
        sys.exit(1)
    for obj_id, info in sorted(infos.items()):
        print(f"obj {obj_id}: diameter {info['diameter']:.1f} mm")
    print(f"wrote {Path(cfg.data.root) / 'models' / 'models_info.json'}")


if __name__ == "__main__":
    main()
