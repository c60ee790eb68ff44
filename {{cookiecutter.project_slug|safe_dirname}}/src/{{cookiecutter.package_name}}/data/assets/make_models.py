"""Regenerate the example's object models (BOP `models/`): `python make_models.py` in this folder.

obj_000001: asymmetric - a box whose six faces have six colours, an orange cylinder arm on the +x face
(off-centre, towards +y) and a white fin on top near the -x/-y corner, so every view is unambiguous.
obj_000002: symmetric - an untextured grey cylinder (r 30 mm, h 80 mm): continuous symmetry about z and
a discrete 180 deg flip about x (caps alike), to exercise ADD-S.
Writes binary PLY (mm, vertex colours, triangles) and models_info.json (diameter = largest vertex
distance, extents, BOP symmetry lists). Only numpy, so the output is reproducible anywhere.
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "models"


def grid_quad(origin, du, dv, n_u, n_v):
    """A planar quad origin + s*du + t*dv (s, t in [0,1]) split into n_u x n_v cells of two triangles;
    the triangle winding gives the normal du x dv."""
    s, t = np.meshgrid(np.linspace(0, 1, n_u + 1), np.linspace(0, 1, n_v + 1), indexing="ij")
    verts = origin + s[..., None] * du + t[..., None] * dv
    idx = np.arange((n_u + 1) * (n_v + 1)).reshape(n_u + 1, n_v + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return verts.reshape(-1, 3), faces


def box(center, size, colors, cells=4):
    """Axis-aligned box, outward-facing; colors: six RGB for faces +x, -x, +y, -y, +z, -z."""
    c, h = np.asarray(center, float), np.asarray(size, float) / 2
    parts = []
    for axis in range(3):
        for sign in (1, -1):
            u, v = [(a) for a in range(3) if a != axis]
            normal = np.zeros(3)
            normal[axis] = sign
            du, dv = np.zeros(3), np.zeros(3)
            du[u], dv[v] = 2 * h[u], 2 * h[v]
            if np.dot(np.cross(du, dv), normal) < 0:
                du, dv = dv, du
            origin = c + normal * h - du / 2 - dv / 2
            verts, faces = grid_quad(origin, du, dv, cells, cells)
            parts.append((verts, faces, colors[2 * axis + (0 if sign == 1 else 1)]))
    return parts


def cylinder(center, radius, height, color, axis=2, segments=32, rings=4):
    """Closed cylinder along `axis`: side (rings x segments) and two fan caps, outward-facing."""
    a = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    zs = np.linspace(-height / 2, height / 2, rings + 1)
    ring = np.stack([radius * np.cos(a), radius * np.sin(a)], -1)
    side = np.concatenate([np.concatenate([ring, np.full((segments, 1), z)], 1) for z in zs])
    faces = []
    for r in range(rings):
        for i in range(segments):
            j = (i + 1) % segments
            p, q, s, t = r * segments + i, r * segments + j, (r + 1) * segments + j, (r + 1) * segments + i
            faces += [[p, q, s], [p, s, t]]
    parts = [(side, np.array(faces), color)]
    for sign in (1, -1):
        verts = np.concatenate(
            [
                [[0, 0, sign * height / 2]],
                np.concatenate([ring, np.full((segments, 1), sign * height / 2)], 1),
            ]
        )
        fan = [[0, 1 + i, 1 + (i + 1) % segments] for i in range(segments)]
        parts.append((verts, np.array(fan) if sign == 1 else np.array(fan)[:, ::-1], color))
    perm = {2: [0, 1, 2], 0: [2, 0, 1], 1: [1, 2, 0]}[axis]  # local z -> the requested axis
    return [(v[:, perm] + np.asarray(center, float), f, col) for v, f, col in parts]


def merge(parts):
    verts, faces, colors, offset = [], [], [], 0
    for v, f, col in parts:
        verts.append(v)
        faces.append(f + offset)
        colors.append(np.tile(np.asarray(col, np.uint8), (len(v), 1)))
        offset += len(v)
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(colors)


def write_ply(path, verts, faces, colors):
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment made by make_models.py, units mm\n"
        f"element vertex {len(verts)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    vdt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    v = np.empty(len(verts), vdt)
    v["x"], v["y"], v["z"] = verts.T
    v["r"], v["g"], v["b"] = colors.T
    fdt = np.dtype([("n", "u1"), ("i", "<i4", (3,))])
    f = np.empty(len(faces), fdt)
    f["n"], f["i"] = 3, faces
    path.write_bytes(header.encode() + v.tobytes() + f.tobytes())


def model_info(verts, symmetries_discrete=(), symmetries_continuous=()):
    diff = verts[:, None, :] - verts[None, :, :]
    lo, hi = verts.min(0), verts.max(0)
    info = {"diameter": float(np.sqrt((diff**2).sum(-1)).max())}
    for i, k in enumerate("xyz"):
        info[f"min_{k}"], info[f"max_{k}"], info[f"size_{k}"] = (
            float(lo[i]),
            float(hi[i]),
            float(hi[i] - lo[i]),
        )
    info["symmetries_discrete"] = [list(map(float, m)) for m in symmetries_discrete]
    info["symmetries_continuous"] = list(symmetries_continuous)
    return info


def asymmetric_object():
    face_colors = [
        (220, 40, 40),
        (40, 200, 220),
        (40, 190, 60),
        (200, 50, 200),
        (40, 70, 220),
        (230, 210, 40),
    ]
    parts = box((0, 0, 0), (70, 40, 30), face_colors, cells=6)
    parts += cylinder((52, 8, 0), 8, 34, (255, 140, 0), axis=0, segments=24, rings=3)
    white = [(240, 240, 240)] * 6
    parts += box((-22, -10, 25), (16, 8, 20), white, cells=2)
    verts, faces, colors = merge(parts)
    verts -= (verts.min(0) + verts.max(0)) / 2  # BOP models are centred on their bounding box
    return verts, faces, colors


def symmetric_object():
    return merge(cylinder((0, 0, 0), 30, 80, (160, 160, 160), axis=2, segments=48, rings=6))


def main():
    HERE.mkdir(exist_ok=True)
    flip_x = np.diag([1.0, -1.0, -1.0, 1.0]).reshape(-1)  # 180 deg about x, row-major 4x4 (BOP)
    objects = {
        1: (asymmetric_object(), {}),
        2: (
            symmetric_object(),
            {
                "symmetries_discrete": [flip_x],
                "symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}],
            },
        ),
    }
    infos = {}
    for obj_id, ((verts, faces, colors), sym) in objects.items():
        write_ply(HERE / f"obj_{obj_id:06d}.ply", verts, faces, colors)
        infos[str(obj_id)] = model_info(verts, **sym)
        print(
            f"obj_{obj_id:06d}: {len(verts)} vertices, {len(faces)} faces, diameter {infos[str(obj_id)]['diameter']:.1f} mm"
        )
    (HERE / "models_info.json").write_text(json.dumps(infos, indent=2) + "\n")


if __name__ == "__main__":
    main()
