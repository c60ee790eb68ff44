"""Stage 2: the capture rig. Renders the object at random 6D poses and writes a BOP dataset.

    python -m <package>.data.capture                                  # 2_data/dataset/ (configs/data/synthetic.yaml)
    python -m <package>.data.capture data.capture.num_images.train=64 # fewer images
    python -m <package>.data.capture data.obj_id=2                    # the symmetric object
    python -m <package>.data.capture data.capture.workers=8           # 8 render processes (default: 1 per core)
    python -m <package>.data.capture data=scenes                      # full frames, several objects: data/scenes.py

Mitsuba 3 (variant scalar_rgb: CPU, no GPU, no OpenGL) renders each image twice: the colour image with
`spp` random samples per pixel, and the labels (depth, masks) with one ray through each pixel centre, so
labels are exact for the pose: a model point X projects to u = K (R X + t) and the ray through pixel u hits
the surface at depth z = (R X + t)_z. Ground truth needs no annotation; `make qa` checks it anyway.

Conventions (BOP): mm, OpenCV camera (+x right, +y down, +z forward), cam_R_m2c row-major, pixel
centres at integer coordinates. The mitsuba scene is built once in the object's frame and the camera
moves (no rebuild of the ray-tracing structure per image); mitsuba's camera looks down +z with +x left
and +y up, i.e. the OpenCV camera turned 180 deg about z. The whole dataset is written into a temporary
folder that replaces cfg.data.root only when complete; a capture killed outright (SIGKILL) leaves that
folder behind, and the next capture of the same dataset removes it (and says so).
"""

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import roma
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import tracking
from ..files import atomic_dir
from ..paths import CONFIG_DIR
from .bop import BopFormatError, load_models_info, read_ply
from .render import (  # shared with data/scenes.py
    ASSETS,
    DEPTH_SCALE,
    NEAR_CLIP,
    OWNER_FILE,
    SPLITS,
    CaptureError,
    colored_mesh,
    composite,
    gt_info,
    load_mitsuba,
    ray_to_z,
    render_depth,
    sample_background,
    sample_light,
    sample_translation,
    save_png,
    sensors,
    srgb_to_linear,
    sweep_stale_temp_dirs,
    visible_mask,
)
from .scenes import capture_scenes


def intrinsics(camera, image_size):
    """K for square images of `image_size` px: `camera` (data.camera, given for `camera.size` px) scaled by
    image_size / size, pixel centres at integer coordinates (c' = (c + 0.5) s - 0.5)."""
    s = float(image_size) / float(camera.get("size") or image_size)
    fx, fy, cx, cy = (float(camera[k]) for k in ("fx", "fy", "cx", "cy"))
    return np.array(
        [[fx * s, 0.0, (cx + 0.5) * s - 0.5], [0.0, fy * s, (cy + 0.5) * s - 0.5], [0.0, 0.0, 1.0]]
    )


class Renderer:
    """Mitsuba scenes for each object, in the object's frame; `render` moves the camera (and the light,
    occluders) to a pose and renders colour and labels. Per object: `plain` (object and point light),
    `occluded` (plus the occluders; only it needs its ray-tracing structure rebuilt per image) and `alone`
    (the object only, for the full silhouette behind occluders).

    Lighting: a point light and ambient light. Ambient is emitted by each surface itself (an area emitter
    with radiance ambient x colour and sampling weight 0), which is noise-free; with BSDF sampling off the
    direct integrator then only samples the point light, so `spp` only antialiases."""

    def __init__(self, models_dir, obj_ids, K, size, spp, max_occluders):
        mi = load_mitsuba()
        self.mi, self.K, self.size, self.spp = mi, np.asarray(K, float), int(size), int(spp)
        self.max_occluders = int(max_occluders)
        self.color_sensor, self.label_sensor = sensors(mi, self.K, self.size, self.spp)
        self.sensor_params = [mi.traverse(self.color_sensor), mi.traverse(self.label_sensor)]
        self.color_integrator = mi.load_dict({"type": "direct", "bsdf_samples": 0, "emitter_samples": 1})
        self.depth_integrator = mi.load_dict({"type": "depth"})
        self.ray_to_z = ray_to_z(self.K, self.size)
        self.models = {}
        for obj_id in obj_ids:
            path = models_dir / f"obj_{obj_id:06d}.ply"
            verts, faces, colors = read_ply(path)
            if len(faces) == 0:
                raise CaptureError(f"{path}: the model has no faces to render")
            if colors is None:
                colors = np.full((len(verts), 3), 180, np.uint8)
            self.models[obj_id] = self._build(verts, faces, colors)

    def _mesh(self, verts, faces, colors=None):
        return colored_mesh(self.mi, verts, faces, colors)

    def _build(self, verts, faces, colors):
        mi = self.mi
        light = {
            "type": "point",
            "position": [0.0, 0.0, 0.0],
            "intensity": {"type": "rgb", "value": [1.0] * 3},
        }
        plain = mi.load_dict({"type": "scene", "object": self._mesh(verts, faces, colors), "light": light})
        scene = {"type": "scene", "object": self._mesh(verts, faces, colors), "light": light}
        for i in range(self.max_occluders):
            # even: a sphere (moved by to_world), odd: a box (a mesh, moved by its vertices). Distinct
            # initial values: mitsuba merges identical plugin dicts into one shared instance.
            value = [0.5, 0.5, 0.5 - 0.01 * i]
            scene[f"occluder{i}"] = {
                "type": "sphere" if i % 2 == 0 else "cube",
                "bsdf": {"type": "diffuse", "reflectance": {"type": "rgb", "value": value}},
                "emitter": {
                    "type": "area",
                    "radiance": {"type": "rgb", "value": value},
                    "sampling_weight": 0.0,
                },
            }
        occluded = mi.load_dict(scene)
        params = mi.traverse(occluded)
        cube = (
            np.array(params["occluder1.vertex_positions"]).reshape(-1, 3) if self.max_occluders > 1 else None
        )
        alone = mi.load_dict({"type": "scene", "object": self._mesh(verts, faces)})
        return {
            "verts": verts,
            "plain": (plain, mi.traverse(plain)),
            "occluded": (occluded, params),
            "alone": alone,
            "cube": cube,
        }

    def _depth(self, scene, seed):
        return render_depth(self.mi, scene, self.label_sensor, self.depth_integrator, self.ray_to_z, seed)

    def render(self, obj_id, R, t, occluders, light, ambient, background, seed):
        """Colour image (uint8 HxWx3, sRGB), depth (float mm, 0 = nothing), mask, mask_visib (bool HxW).

        Everything is given in the OpenCV camera frame: the pose (R, t mm); occluders, a list of (kind,
        centre mm, size mm, rgb in [0,1], rotation 3x3), spheres at even and boxes at odd positions;
        light (position mm, rgb intensity); ambient (radiance factor); background HxWx3 sRGB in [0,1]."""
        mi, model = self.mi, self.models[obj_id]
        R, t = np.asarray(R, float), np.asarray(t, float)
        # camera -> object frame; the mitsuba camera is the OpenCV one turned 180 deg about z
        cam_to_obj = np.eye(4)
        cam_to_obj[:3, :3], cam_to_obj[:3, 3] = R.T, -R.T @ t
        to_world = mi.ScalarTransform4f((cam_to_obj @ np.diag([-1.0, -1.0, 1.0, 1.0])).tolist())
        for params in self.sensor_params:
            params["to_world"] = to_world
            params.update()

        def in_object_frame(points):
            return (np.asarray(points, float) - t) @ R

        scene, params = model["occluded"] if occluders else model["plain"]
        for i, (_, centre, size, rgb, rot) in enumerate(occluders):
            half = float(size) / 2  # sphere radius / cube half-edge (mitsuba's cube spans [-1, 1])
            if i % 2 == 0:
                centre_obj = [float(c) for c in in_object_frame(centre)]
                params[f"occluder{i}.to_world"] = mi.ScalarTransform4f().translate(centre_obj).scale(half)
            else:
                verts = in_object_frame(half * model["cube"] @ rot.T + centre)
                params[f"occluder{i}.vertex_positions"] = verts.astype(np.float32).ravel()
            albedo = srgb_to_linear(np.asarray(rgb, float))
            params[f"occluder{i}.bsdf.reflectance.value"] = [float(c) for c in albedo]
            params[f"occluder{i}.emitter.radiance.value"] = [float(c) for c in ambient * albedo]
        if occluders:  # park the unused ones far behind the camera
            park = in_object_frame([0.0, 0.0, -1e5])
            for i in range(len(occluders), self.max_occluders):
                if i % 2 == 0:
                    params[f"occluder{i}.to_world"] = mi.ScalarTransform4f().translate(
                        [float(c) for c in park]
                    )
                else:
                    params[f"occluder{i}.vertex_positions"] = (
                        (model["cube"] + park).astype(np.float32).ravel()
                    )
        position, intensity = light
        params["light.position"] = [float(c) for c in in_object_frame(position)]
        params["light.intensity.value"] = [float(c) for c in intensity]
        params["object.emitter.radiance.scale"] = float(ambient)
        params.update()
        rgba = np.asarray(
            mi.render(
                scene, sensor=self.color_sensor, integrator=self.color_integrator, seed=seed, spp=self.spp
            )
        )
        image = composite(rgba, background)
        depth, hit = self._depth(scene, seed)
        if occluders:
            depth_obj, mask = self._depth(model["alone"], seed)
            mask_visib = visible_mask(mask, hit, depth, depth_obj)
        else:
            mask, mask_visib = hit, hit
        return image, depth, mask, mask_visib


# --- random scene parameters --------------------------------------------------------------------------------


def sample_occluders(rng, cfg_occ, t, near_z, diameter, box_rotation):
    """0..max_count spheres/boxes between the camera and the object's nearest point (`near_z`, mm), each
    over a random part of the object."""
    if rng.random() >= cfg_occ.probability:
        return []
    occluders = []
    for i in range(int(rng.integers(1, cfg_occ.max_count + 1))):
        size = rng.uniform(*cfg_occ.size) * diameter
        # its centre between 2/3 of the way to the object and just in front of it (never inside it)
        far = near_z - 0.9 * size  # a box's half diagonal is 0.87 x its edge
        if far <= NEAR_CLIP + size:  # no room (keeps the order sphere, box that render() expects)
            break
        depth = rng.uniform(max(0.65 * near_z, NEAR_CLIP + size), far)
        # aim at a point of the object within ~ its radius from the centre, seen from the camera
        target = t + rng.uniform(-0.4, 0.4, size=3) * diameter
        centre = target * depth / target[2]
        colour = rng.uniform(0.05, 0.95, size=3)
        occluders.append(("sphere" if i % 2 == 0 else "box", centre, size, colour, box_rotation))
    return occluders


# --- BOP annotations ----------------------------------------------------------------------------------------


_renderers = {}  # per process: a worker builds its renderer on its first job and keeps it


def renderer_for(cfg):
    cap = cfg.data.capture
    models_dir = Path(cap.get("models_dir") or ASSETS)
    obj_ids = tuple(int(o) for o in cap.objects)
    K = intrinsics(cfg.data.camera, cfg.data.image_size)
    key = (
        str(models_dir),
        obj_ids,
        K.tobytes(),
        int(cfg.data.image_size),
        int(cap.spp),
        int(cap.occluders.max_count),
    )
    if key not in _renderers:
        _renderers.clear()
        _renderers[key] = Renderer(models_dir, obj_ids, K, key[3], key[4], key[5])
    return _renderers[key]


def render_images(job):
    """Render a run of consecutive images of one split and object, write their PNGs, return their
    annotations [(im_id, scene_gt entry, scene_camera entry, scene_gt_info entry)]. Every image has its
    own random stream (seed, split, im_id), so the dataset does not depend on how images are split
    across worker processes."""
    cfg, split_index, obj_id, first_im_id, rotations, box_rotations, scene_dir, diameter = job
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    renderer = renderer_for(cfg)
    cap, size, K = cfg.data.capture, int(cfg.data.image_size), renderer.K
    verts = renderer.models[obj_id]["verts"]
    annotations = []
    for offset, (R, box_rotation) in enumerate(zip(rotations, box_rotations, strict=True)):
        im_id = first_im_id + offset
        rng = np.random.default_rng([int(cap.seed), split_index, im_id])
        rotated = verts @ R.T
        t = sample_translation(rng, rotated, K, size, cap.distance_mm, cap.margin_px)
        near_z = float((rotated[:, 2] + t[2]).min())
        occluders = sample_occluders(rng, cap.occluders, t, near_z, diameter, box_rotation)
        light, ambient = sample_light(rng, cap.light, t)
        background = sample_background(rng, list(cap.background.kinds), size)
        seed = split_index * 10_000_000 + im_id
        image, depth, mask, mask_visib = renderer.render(
            obj_id, R, t, occluders, light, ambient, background, seed
        )
        name = f"{im_id:06d}"
        save_png(scene_dir / "rgb" / f"{name}.png", image)
        save_png(scene_dir / "depth" / f"{name}.png", np.round(depth / DEPTH_SCALE).astype(np.uint16))
        save_png(scene_dir / "mask" / f"{name}_000000.png", mask.astype(np.uint8) * 255)
        save_png(scene_dir / "mask_visib" / f"{name}_000000.png", mask_visib.astype(np.uint8) * 255)
        gt = {
            "cam_R_m2c": [float(x) for x in R.reshape(-1)],
            "cam_t_m2c": [float(x) for x in t],
            "obj_id": obj_id,
        }
        camera = {"cam_K": [float(x) for x in K.reshape(-1)], "depth_scale": DEPTH_SCALE}
        annotations.append((im_id, gt, camera, gt_info(mask, mask_visib, depth)))
    return annotations


def capture_jobs(cfg, tmp, infos, chunk=200):
    """The work as jobs of `chunk` images, split by split; also the scene folder of each split."""
    cap = cfg.data.capture
    n_objects = len(cap.objects)
    plain_cfg = {"data": OmegaConf.to_container(cfg.data, resolve=True)}  # what a worker needs, picklable
    jobs, scenes = [], {}
    for split_index, split in enumerate(SPLITS):
        scene_dir = tmp / split / "000000"
        for sub in ("rgb", "depth", "mask", "mask_visib"):
            (scene_dir / sub).mkdir(parents=True)
        scenes[split] = scene_dir
        n = int(cap.num_images[split])
        # rotations uniform on SO(3) (roma), drawn up front from one generator per split
        generator = torch.Generator().manual_seed(int(cap.seed) * 1000 + split_index)
        rotations = roma.random_rotmat(n * n_objects, generator=generator).double().numpy()
        box_rotations = roma.random_rotmat(n * n_objects, generator=generator).double().numpy()
        for k, obj_id in enumerate(int(o) for o in cap.objects):
            diameter = infos[obj_id]["diameter"]
            for first in range(k * n, (k + 1) * n, chunk):
                last = min((k + 1) * n, first + chunk)
                views = rotations[first:last], box_rotations[first:last]
                job = (plain_cfg, split_index, obj_id, first, *views, scene_dir, diameter)
                jobs.append((split, job))
    return jobs, scenes


def validate(cfg):
    d = cfg.data
    if d.get("capture") is None:
        raise CaptureError(
            f"data={d.get('name')}: has no `capture` (nor `scenes`) section; capture renders data=synthetic "
            "(object-centred images) or data=scenes (full frames, data/scenes.py)"
        )
    cap = d.capture
    if int(d.image_size) < 8:
        raise CaptureError(f"data.image_size: {d.image_size} is too small (>= 8 px)")
    if float(d.camera.fx) != float(d.camera.fy):
        raise CaptureError(
            f"data.camera: fx ({float(d.camera.fx)}) != fy ({float(d.camera.fy)}); the mitsuba pinhole has square pixels"
        )
    lo, hi = (float(x) for x in cap.distance_mm)
    if not 0 < lo <= hi:
        raise CaptureError(f"data.capture.distance_mm: {list(cap.distance_mm)} must be 0 < min <= max")
    for split in SPLITS:
        if int(cap.num_images[split]) < 1:
            raise CaptureError(f"data.capture.num_images.{split}: must be >= 1 (got {cap.num_images[split]})")
    if int(cap.spp) < 1:
        raise CaptureError(f"data.capture.spp: must be >= 1 (got {cap.spp})")
    if not 0 <= float(cap.occluders.probability) <= 1:
        raise CaptureError(f"data.capture.occluders.probability: {cap.occluders.probability} not in [0, 1]")
    models_dir = Path(cap.get("models_dir") or ASSETS)
    if models_dir.name != "models":
        raise CaptureError(f"data.capture.models_dir: {models_dir} must be a BOP models/ folder")
    infos = load_models_info(models_dir.parent)
    missing = [int(o) for o in cap.objects if int(o) not in infos]
    if missing:
        raise CaptureError(f"data.capture.objects: {missing} not in {models_dir / 'models_info.json'}")
    return models_dir, infos


def worker_count(cfg, total):
    """data.capture.workers: an int, or auto = one process per CPU core, but none for small captures
    (starting a process costs more than rendering a few hundred images)."""
    workers = cfg.data.capture.get("workers", "auto")
    if workers == "auto":
        return min(os.cpu_count() or 1, total // 500)
    return int(workers)


def _init_worker():
    torch.set_num_threads(1)


def capture(cfg):
    """Render the dataset described by cfg.data into cfg.data.root, atomically. Returns (images, seconds)."""
    models_dir, infos = validate(cfg)
    cap = cfg.data.capture
    size = int(cfg.data.image_size)
    K = intrinsics(cfg.data.camera, cfg.data.image_size)
    total = sum(int(cap.num_images[s]) for s in SPLITS) * len(cap.objects)
    workers = worker_count(cfg, total)
    root = Path(cfg.data.root)
    for folder in sweep_stale_temp_dirs(root):
        print(f"capture: removed {folder}, the temporary folder of a capture that was killed", flush=True)
    start = time.perf_counter()
    with (
        atomic_dir(root) as tmp,
        tqdm(total=total, desc="capture", unit="img", file=sys.stdout) as progress,
        contextlib.ExitStack() as stack,
    ):
        owner = tmp / OWNER_FILE
        owner.write_text(str(os.getpid()))
        shutil.copytree(models_dir, tmp / "models", ignore=shutil.ignore_patterns(".*"))
        camera = {"cx": K[0, 2], "cy": K[1, 2], "fx": K[0, 0], "fy": K[1, 1], "width": size, "height": size}
        (tmp / "camera.json").write_text(json.dumps(camera | {"depth_scale": DEPTH_SCALE}, indent=2) + "\n")
        jobs, scenes = capture_jobs(cfg, tmp, infos)
        if workers > 1:
            # spawn: a fresh interpreter per worker (mitsuba and torch keep threads a fork would break)
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, initializer=_init_worker))
            results = pool.imap(render_images, [job for _, job in jobs])
        else:
            results = map(render_images, [job for _, job in jobs])
        labels = {split: ({}, {}, {}) for split in SPLITS}
        for (split, _), annotations in zip(jobs, results, strict=True):
            scene_gt, scene_camera, scene_gt_info = labels[split]
            for im_id, gt, camera_entry, info in annotations:
                scene_gt[str(im_id)], scene_camera[str(im_id)] = [gt], camera_entry
                scene_gt_info[str(im_id)] = [info]
            progress.update(len(annotations))
        for split, scene_dir in scenes.items():
            for name, data in zip(("scene_gt", "scene_camera", "scene_gt_info"), labels[split], strict=True):
                ordered = dict(sorted(data.items(), key=lambda item: int(item[0])))
                (scene_dir / f"{name}.json").write_text(json.dumps(ordered) + "\n")
        owner.unlink()  # complete: atomic_dir moves it into place
    return total, time.perf_counter() - start


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig):
    try:
        run = tracking.start_run(cfg, "capture")
        # a data config with a `scenes` section asks for full frames with several objects (data=scenes)
        images, seconds = (capture_scenes if cfg.data.get("scenes") else capture)(cfg)
        rate = images / seconds
        print(f"captured {images} images into {cfg.data.root} in {seconds:.1f} s: {rate:.0f} images/s")
        run.log({"capture/images": images, "capture/images_per_s": rate})
        run.finish()
    except (CaptureError, BopFormatError, OSError) as e:
        print(f"capture failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
