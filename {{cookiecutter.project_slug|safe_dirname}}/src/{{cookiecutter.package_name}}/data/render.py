"""Stage 2: what the two capture modes share. data/capture.py renders object-centred images, data/scenes.py
full frames with several objects; both use these mitsuba pieces (camera, coloured meshes), random light
and background, BOP annotations and the sweep of killed captures' temporary folders.

Conventions (BOP): mm, OpenCV camera (+x right, +y down, +z forward), pixel centres at integer
coordinates. Mitsuba's camera looks down +z with +x left and +y up (the OpenCV camera turned 180 deg
about z); its film puts pixel centres at i + 0.5, so the principal point is shifted by half a pixel.
A size is an int (square image) or (height, width).
"""

import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent / "assets" / "models"
SPLITS = ("train", "val", "test")
DEPTH_SCALE = 0.1  # mm per depth-PNG unit: uint16 covers 0-6.5 m at 0.1 mm
NEAR_CLIP = 1.0  # mm
OWNER_FILE = ".capture.pid"  # in a capture's temporary folder while it writes: the owning process


class CaptureError(ValueError):
    """The capture configuration is unusable; the message names the key."""


def hw(size):
    """(height, width) of a size given as an int (square) or (height, width)."""
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def srgb_to_linear(c):
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c):
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


# --- mitsuba ------------------------------------------------------------------------------------------------


def load_mitsuba():
    """mitsuba in its CPU variant (scalar_rgb: no GPU, no OpenGL), one render thread: parallelism comes
    from worker processes."""
    import drjit as dr
    import mitsuba as mi

    mi.set_variant("scalar_rgb")
    mi.set_log_level(mi.LogLevel.Warn)
    dr.set_thread_count(1)
    return mi


def sensors(mi, K, size, spp):
    """(colour sensor with `spp` random samples per pixel, label sensor with one ray exactly through each
    pixel centre: labels that agree with K [R|t] to float precision) for the pinhole K (fx == fy)."""
    height, width = hw(size)
    fx, cx, cy = K[0, 0], K[0, 2], K[1, 2]
    base = {
        "type": "perspective",
        "fov": float(np.degrees(2 * np.arctan(width / (2 * fx)))),
        "fov_axis": "x",
        # as a fraction of the film, in mitsuba's camera (turned 180 deg about z from OpenCV's): negated
        "principal_point_offset_x": -float((cx + 0.5 - width / 2) / width),
        "principal_point_offset_y": -float((cy + 0.5 - height / 2) / height),
        "near_clip": NEAR_CLIP,
        "far_clip": 1e6,
    }
    film = {
        "type": "hdrfilm",
        "width": width,
        "height": height,
        "rfilter": {"type": "box"},
        "pixel_format": "rgba",
    }
    color_sampler = {"type": "independent", "sample_count": int(spp)}
    label_sampler = {"type": "stratified", "sample_count": 1, "jitter": False}
    return (
        mi.load_dict(base | {"film": film, "sampler": color_sampler}),
        mi.load_dict(base | {"film": film, "sampler": label_sampler}),
    )


def ray_to_z(K, size):
    """Per pixel, z depth / ray length: the ray through pixel (u, v) has direction K^-1 (u, v, 1) normalised."""
    height, width = hw(size)
    v, u = np.mgrid[0:height, 0:width]
    x, y = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    return 1.0 / np.sqrt(x * x + y * y + 1.0)


def colored_mesh(mi, verts, faces, colors=None, name="object"):
    """A mitsuba mesh; with vertex colours (sRGB uint8), a diffuse surface of that colour that also glows
    with it (an area emitter of sampling weight 0: noise-free ambient light, its strength set through the
    parameter `emitter.radiance.scale`)."""
    props = mi.Properties()
    if colors is not None:
        vertex_color = {"type": "mesh_attribute", "name": "vertex_color"}
        props["bsdf"] = mi.load_dict({"type": "diffuse", "reflectance": vertex_color})
        props["emitter"] = mi.load_dict({"type": "area", "radiance": vertex_color, "sampling_weight": 0.0})
    mesh = mi.Mesh(name, len(verts), len(faces), props=props, has_vertex_normals=False)
    if colors is not None:
        mesh.add_attribute("vertex_color", 3, srgb_to_linear(colors / 255.0).astype(np.float32).ravel())
    params = mi.traverse(mesh)
    params["vertex_positions"] = verts.astype(np.float32).ravel()
    params["faces"] = faces.astype(np.uint32).ravel()
    params.update()
    return mesh


def composite(rgba, background):
    """uint8 sRGB image: the render's premultiplied colour over the background (HxWx3 sRGB in [0,1]), in
    linear light."""
    alpha = np.clip(rgba[..., 3:4], 0.0, 1.0)
    color = rgba[..., :3] + (1.0 - alpha) * srgb_to_linear(background)
    return np.round(linear_to_srgb(color) * 255).astype(np.uint8)


def render_depth(mi, scene, sensor, integrator, to_z, seed):
    """z depth (mm, 0 = nothing) and hit mask of a render with the `depth` integrator."""
    out = np.asarray(mi.render(scene, sensor=sensor, integrator=integrator, seed=seed))
    hit = out[..., -1] > 0.5
    # mitsuba starts camera rays on the near plane: the ray length misses NEAR_CLIP of z
    return np.where(hit, out[..., 0] * to_z + NEAR_CLIP, 0.0), hit


def visible_mask(mask, hit, depth, depth_own):
    """Where an object (rendered alone: `mask`, `depth_own`) is visible in the whole scene (`hit`, `depth`):
    the first surface on the ray is its own (same depth, up to float noise)."""
    return mask & hit & (np.abs(depth - depth_own) < 1e-4 * depth_own + 1e-3)


# --- random scene parameters --------------------------------------------------------------------------------


def sample_translation(
    rng,
    rotated,
    K,
    size,
    distance,
    margin,
    candidates=32,
    tries=20,
    key="data.capture.distance_mm",
    window=None,
):
    """A translation at a random distance along the ray through a random pixel (of `window`, (u0, v0, u1,
    v1), default the whole image), such that every model vertex (already rotated) projects at least
    `margin` px inside the image (vectorised rejection)."""
    height, width = hw(size)
    high = np.array([width - 1 - margin, height - 1 - margin])
    low, top = (margin, high) if window is None else (np.asarray(window[:2]), np.asarray(window[2:]))
    Kinv = np.linalg.inv(K)
    for _ in range(tries):
        d = rng.uniform(*distance, size=candidates)
        uv1 = np.concatenate([rng.uniform(low, top, size=(candidates, 2)), np.ones((candidates, 1))], 1)
        rays = uv1 @ Kinv.T
        ts = d[:, None] * rays / np.linalg.norm(rays, axis=1, keepdims=True)
        cam = rotated[None] + ts[:, None, :]  # candidates x N x 3
        z = cam[..., 2]
        proj = (cam @ K.T)[..., :2] / np.maximum(z, 1e-6)[..., None]
        ok = (z.min(1) > 1.0) & (proj.min(axis=(1, 2)) >= margin) & (proj.max(axis=1) <= high).all(1)
        if ok.any():
            return ts[int(np.argmax(ok))]
    shape = f"{width}x{height}" if width != height else f"{width}"
    raise CaptureError(
        f"{key} {list(distance)}: the object does not fit in a {shape} px image at this "
        "distance; increase the distance or decrease the focal length"
    )


def sample_light(rng, cfg_light, t):
    """A point light around the object, on the camera's side, with intensity set so that a surface facing
    it is lit to radiance ~ `intensity` x albedo, and an ambient radiance."""
    direction = rng.normal(size=3)
    direction[2] = -abs(direction[2])  # towards the camera (camera looks along +z)
    direction /= np.linalg.norm(direction)
    distance = rng.uniform(*cfg_light.distance_mm)
    tint = rng.uniform(0.85, 1.15, size=3)
    intensity = rng.uniform(*cfg_light.intensity) * np.pi * distance**2 * tint
    ambient = float(rng.uniform(*cfg_light.ambient))
    return (t + distance * direction, intensity), ambient


def sample_background(rng, kinds, size, key="data.capture.background.kinds"):
    """HxWx3 sRGB in [0,1]: a flat colour, a linear two-colour gradient, or blotchy noise."""
    height, width = hw(size)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "flat":
        return np.broadcast_to(rng.uniform(0, 1, size=3), (height, width, 3)).copy()
    if kind == "gradient":
        a, b = rng.uniform(0, 1, size=(2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        v, u = np.mgrid[0:height, 0:width]
        u, v = u / (width - 1), v / (height - 1)
        s = (np.cos(angle) * (u - 0.5) + np.sin(angle) * (v - 0.5)) / np.sqrt(0.5) + 0.5
        return a + np.clip(s, 0, 1)[..., None] * (b - a)
    if kind == "noise":
        cells = int(rng.integers(2, 9))
        coarse = (rng.uniform(0, 1, size=(cells, cells, 3)) * 255).astype(np.uint8)
        smooth = (
            np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float64)
            / 255
        )
        return np.clip(smooth + rng.normal(0, 0.04, size=(height, width, 3)), 0, 1)
    raise CaptureError(f"{key}: unknown kind {kind!r} (flat, gradient, noise)")


# --- BOP annotations ----------------------------------------------------------------------------------------


def bbox(mask):
    """BOP [x, y, w, h] of a mask's pixels, [-1, -1, -1, -1] when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [-1, -1, -1, -1]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def gt_info(mask, mask_visib, depth):
    px_all, px_visib = int(mask.sum()), int(mask_visib.sum())
    return {
        "bbox_obj": bbox(mask),
        "bbox_visib": bbox(mask_visib),
        "px_count_all": px_all,
        "px_count_valid": int((mask & (depth > 0)).sum()),
        "px_count_visib": px_visib,
        "visib_fract": float(px_visib / px_all) if px_all else 0.0,
    }


def save_png(path, array):
    Image.fromarray(array).save(path, compress_level=1)


# --- killed captures ----------------------------------------------------------------------------------------


def process_alive(pid):
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never call a process dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def sweep_stale_temp_dirs(root):
    """Remove the temporary folders (`.<name>.<random>` beside `root`) of earlier captures of `root` that
    were killed before they could clean up (SIGKILL, out of memory, power loss): only folders holding an
    OWNER_FILE whose process no longer runs. Returns the removed folders."""
    root = Path(root)
    pattern = re.compile(rf"\.{re.escape(root.name)}\.[a-z0-9_]{{8}}")  # tempfile.mkdtemp's random part
    swept = []
    for folder in sorted(root.parent.glob(f".{root.name}.*")) if root.parent.is_dir() else []:
        if not (pattern.fullmatch(folder.name) and folder.is_dir()):
            continue
        try:
            pid = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not marked by a capture (or being created right now): not ours to remove
        if not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept
