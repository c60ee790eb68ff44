"""Stage 2: the scene capture. Renders BOP-PBR-like full frames: several objects per frame at random poses,
clutter (spheres and boxes) and mutual occlusion, and writes the full BOP layout plus a detections file.
It is the capture command's mode for a data config with a `scenes` section:

    python -m <package>.data.capture data=scenes                                  # 640x480, configs/data/scenes.yaml
    python -m <package>.data.capture data=scenes 'data.scenes.image_size=[160,120]' data.scenes.images_per_scene=4

Written under cfg.data.root (atomically, like the object-centred capture):

    models/ (copied from data.scenes.models_dir, default the shipped ones), camera.json
    <split folder>/<scene>/rgb/<im>.png, depth/<im>.png, mask/ and mask_visib/<im>_<gt>.png,
        scene_gt.json (several instances per image), scene_gt_info.json, scene_camera.json
    detections/<split folder>.json   BOP default-detections format, from the GT boxes with noise

Scene ids run on across splits (train 0..n-1, then val, then test), so the test scenes are held out and
a (scene_id, image_id) names one frame of the dataset. Every frame is a fresh random arrangement (its own
random stream: seed, scene, image), objects drawn with replacement from data.scenes.objects (the same
object may appear twice, as in T-LESS). Objects never interpenetrate (their bounding spheres are apart)
and lie wholly inside the frame (data.scenes.margin_px), so bbox_obj is the whole silhouette.

Rendering (mitsuba 3, scalar_rgb, CPU; data/render.py): the camera sits at the origin of the OpenCV frame
and the objects are placed in it, so each frame builds its own scene. Labels use one ray per pixel
centre: depth of the whole scene, then each instance alone for its full mask; it is visible where the
scene's first surface is its own (mask_visib), as in data/capture.py.
"""

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from ..files import atomic_dir
from .bop import load_models_info, read_ply
from .detections import detections_for
from .render import (
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

DEFAULT_COLOUR = 180  # grey for a model without vertex colours


def frame_size(sc):
    """(height, width) from data.scenes.image_size = [width, height]."""
    width, height = (int(x) for x in sc.image_size)
    return height, width


def frame_intrinsics(camera, size):
    """K of a (height, width) frame: `camera` (data.camera, given for camera.width x camera.height px)
    scaled to it, pixel centres at integer coordinates (c' = (c + 0.5) s - 0.5)."""
    height, width = size
    s = width / float(camera.width)
    fx, fy, cx, cy = (float(camera[k]) for k in ("fx", "fy", "cx", "cy"))
    return np.array(
        [[fx * s, 0.0, (cx + 0.5) * s - 0.5], [0.0, fy * s, (cy + 0.5) * s - 0.5], [0.0, 0.0, 1.0]]
    )


def scene_objects(sc, infos, models_dir):
    """The obj_ids to place: data.scenes.objects, or every model of models_info.json that has a PLY."""
    if sc.get("objects") is None:
        return sorted(o for o in infos if (models_dir / f"obj_{o:06d}.ply").is_file())
    return [int(o) for o in sc.objects]


def validate(cfg):
    """The scene capture's settings, checked; returns (models_dir, infos, obj_ids)."""
    d, sc = cfg.data, cfg.data.scenes
    height, width = frame_size(sc)
    if min(height, width) < 8:
        raise CaptureError(f"data.scenes.image_size: {list(sc.image_size)} is too small (>= 8 px a side)")
    cam = d.camera
    if float(cam.fx) != float(cam.fy):
        raise CaptureError(
            f"data.camera: fx ({float(cam.fx)}) != fy ({float(cam.fy)}); the mitsuba pinhole has square pixels"
        )
    if abs(width * float(cam.height) - height * float(cam.width)) > 1e-6 * width * float(cam.height):
        raise CaptureError(
            f"data.scenes.image_size: {width}x{height} has not the aspect of data.camera "
            f"({cam.width}x{cam.height}); the camera is scaled, not stretched"
        )
    folders = [str(d.splits[s]) for s in SPLITS]
    if len(set(folders)) != len(folders):
        raise CaptureError(
            f"data.splits: {dict(zip(SPLITS, folders, strict=True))} must name three different folders"
        )
    for split in SPLITS:
        if int(sc.num_scenes[split]) < 1:
            raise CaptureError(f"data.scenes.num_scenes.{split}: must be >= 1 (got {sc.num_scenes[split]})")
    for key in ("images_per_scene", "spp"):
        if int(sc[key]) < 1:
            raise CaptureError(f"data.scenes.{key}: must be >= 1 (got {sc[key]})")
    lo, hi = (int(x) for x in sc.instances)
    if not 1 <= lo <= hi:
        raise CaptureError(f"data.scenes.instances: {list(sc.instances)} must be 1 <= min <= max")
    if not 0 < float(sc.cluster) <= 1:
        raise CaptureError(f"data.scenes.cluster: {sc.cluster} not in (0, 1]")
    lo, hi = (float(x) for x in sc.distance_mm)
    if not 0 < lo <= hi:
        raise CaptureError(f"data.scenes.distance_mm: {list(sc.distance_mm)} must be 0 < min <= max")
    det = sc.detections
    for key in ("drop", "min_visib_fract"):
        if not 0 <= float(det[key]) <= 1:
            raise CaptureError(f"data.scenes.detections.{key}: {det[key]} not in [0, 1]")
    for key in ("jitter", "false_per_image"):
        if float(det[key]) < 0:
            raise CaptureError(f"data.scenes.detections.{key}: {det[key]} must be >= 0")
    models_dir = Path(sc.get("models_dir") or ASSETS)
    if models_dir.name != "models":
        raise CaptureError(f"data.scenes.models_dir: {models_dir} must be a BOP models/ folder")
    infos = load_models_info(models_dir.parent)
    obj_ids = scene_objects(sc, infos, models_dir)
    missing = [o for o in obj_ids if o not in infos or not (models_dir / f"obj_{o:06d}.ply").is_file()]
    if missing or not obj_ids:
        raise CaptureError(
            f"data.scenes.objects: {missing or 'none'} without a PLY and a models_info.json entry in {models_dir}"
        )
    return models_dir, infos, obj_ids


# --- one frame ----------------------------------------------------------------------------------------------


class SceneRenderer:
    """The models (vertices, faces, colours, bounding radius), the two sensors at the origin looking down
    the OpenCV +z axis, and the integrators; `render` builds and renders one frame."""

    def __init__(self, models_dir, obj_ids, K, size, spp):
        mi = load_mitsuba()
        self.mi, self.K, self.size, self.spp = mi, np.asarray(K, float), size, int(spp)
        self.color_sensor, self.label_sensor = sensors(mi, self.K, size, spp)
        opencv = mi.ScalarTransform4f(np.diag([-1.0, -1.0, 1.0, 1.0]).tolist())  # mitsuba camera -> OpenCV
        for sensor in (self.color_sensor, self.label_sensor):
            params = mi.traverse(sensor)
            params["to_world"] = opencv
            params.update()
        self.color_integrator = mi.load_dict({"type": "direct", "bsdf_samples": 0, "emitter_samples": 1})
        self.depth_integrator = mi.load_dict({"type": "depth"})
        self.ray_to_z = ray_to_z(self.K, size)
        self.models = {}
        for obj_id in obj_ids:
            path = models_dir / f"obj_{obj_id:06d}.ply"
            verts, faces, colors = read_ply(path)
            if len(faces) == 0:
                raise CaptureError(f"{path}: the model has no faces to render")
            if colors is None:
                colors = np.full((len(verts), 3), DEFAULT_COLOUR, np.uint8)
            radius = float(np.linalg.norm(verts, axis=1).max())
            self.models[obj_id] = {"verts": verts, "faces": faces, "colors": colors, "radius": radius}

    def _depth(self, scene, seed):
        return render_depth(self.mi, scene, self.label_sensor, self.depth_integrator, self.ray_to_z, seed)

    def render(self, instances, clutter, light, ambient, background, seed):
        """Colour image (uint8 HxWx3), depth (float mm, 0 = nothing) and per instance (mask, mask_visib).

        instances: [(obj_id, R, t mm)]; clutter: [(kind "sphere"|"cube", centre mm, size mm, rgb in [0,1],
        rotation 3x3)]; light: (position mm, rgb intensity); everything in the OpenCV camera frame."""
        mi = self.mi
        scene = {"type": "scene"}
        alone = []
        for i, (obj_id, R, t) in enumerate(instances):
            model = self.models[obj_id]
            verts = model["verts"] @ np.asarray(R).T + t
            scene[f"instance{i}"] = colored_mesh(mi, verts, model["faces"], model["colors"], f"instance{i}")
            alone.append(mi.load_dict({"type": "scene", "shape": colored_mesh(mi, verts, model["faces"])}))
        for j, (kind, centre, size, rgb, rot) in enumerate(clutter):
            half = float(size) / 2  # sphere radius / cube half-edge (mitsuba's cube spans [-1, 1])
            to_world = np.eye(4)
            to_world[:3, :3] = half * (np.asarray(rot) if kind == "cube" else np.eye(3))
            to_world[:3, 3] = centre
            albedo = [float(c) for c in srgb_to_linear(np.asarray(rgb, float))]
            scene[f"clutter{j}"] = {
                "type": kind,
                "to_world": mi.ScalarTransform4f(to_world.tolist()),
                "bsdf": {"type": "diffuse", "reflectance": {"type": "rgb", "value": albedo}},
                "emitter": {
                    "type": "area",
                    "radiance": {"type": "rgb", "value": [ambient * c for c in albedo]},
                    "sampling_weight": 0.0,
                },
            }
        position, intensity = light
        scene["light"] = {
            "type": "point",
            "position": [float(c) for c in position],
            "intensity": {"type": "rgb", "value": [float(c) for c in intensity]},
        }
        scene = mi.load_dict(scene)
        params = mi.traverse(scene)
        for i in range(len(instances)):
            params[f"instance{i}.emitter.radiance.scale"] = float(ambient)
        params.update()
        rgba = np.asarray(
            mi.render(
                scene, sensor=self.color_sensor, integrator=self.color_integrator, seed=seed, spp=self.spp
            )
        )
        image = composite(rgba, background)
        depth, hit = self._depth(scene, seed)
        masks = []
        for own in alone:
            depth_own, mask = self._depth(own, seed)
            masks.append((mask, visible_mask(mask, hit, depth, depth_own)))
        return image, depth, masks


def random_rotation(rng):
    return Rotation.random(random_state=rng).as_matrix()


def cluster_window(rng, sc, size):
    """(u0, v0, u1, v1): where the objects' centres go, a random window of data.scenes.cluster x the frame
    (piles of objects that hide each other, as in BOP's PBR scenes; 1 = anywhere in the frame)."""
    height, width = size
    extent = float(sc.cluster) * np.array([width - 1, height - 1])
    u0, v0 = rng.uniform(0, 1, size=2) * (np.array([width - 1, height - 1]) - extent)
    return u0, v0, u0 + extent[0], v0 + extent[1]


def sample_instances(rng, sc, renderer, obj_ids, window):
    """[(obj_id, R, t)]: data.scenes.instances objects at random rotations, each wholly inside the frame
    and apart from the others (bounding spheres); an instance that finds no room is left out."""
    lo, hi = (int(x) for x in sc.instances)
    placed = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        obj_id = int(obj_ids[int(rng.integers(len(obj_ids)))])
        model = renderer.models[obj_id]
        for _ in range(20):
            R = random_rotation(rng)
            t = sample_translation(
                rng, model["verts"] @ R.T, renderer.K, renderer.size, sc.distance_mm, sc.margin_px,
                key="data.scenes.distance_mm", window=window,
            )  # fmt: skip
            radius = model["radius"]
            if all(np.linalg.norm(t - t2) > radius + renderer.models[o2]["radius"] for o2, _, t2 in placed):
                placed.append((obj_id, R, t))
                break
    return placed


def sample_clutter(rng, sc, renderer, instances, window):
    """Distractors: spheres and boxes of random colour and size among the objects (centres in `window`),
    from in front of the nearest objects to behind the farthest, touching no object (they occlude and are
    occluded)."""
    lo, hi = (int(x) for x in sc.clutter.count)
    diameter = 2 * np.mean([renderer.models[o]["radius"] for o, _, _ in instances])
    Kinv = np.linalg.inv(renderer.K)
    near, far = 0.6 * float(sc.distance_mm[0]), 1.2 * float(sc.distance_mm[1])
    clutter = []
    for j in range(int(rng.integers(lo, hi + 1))):
        size = rng.uniform(*sc.clutter.size) * diameter
        radius = size * (0.5 if j % 2 == 0 else 0.87)  # a box's half diagonal is 0.87 x its edge
        for _ in range(20):
            ray = Kinv @ [rng.uniform(window[0], window[2]), rng.uniform(window[1], window[3]), 1.0]
            centre = rng.uniform(near, far) * ray / np.linalg.norm(ray)
            apart = all(
                np.linalg.norm(centre - t) > radius + renderer.models[o]["radius"] for o, _, t in instances
            )
            apart &= all(np.linalg.norm(centre - c) > radius + 0.87 * s for _, c, s, _, _ in clutter)
            if apart and centre[2] - radius > NEAR_CLIP + 1.0:
                kind = "sphere" if j % 2 == 0 else "cube"
                clutter.append((kind, centre, size, rng.uniform(0.05, 0.95, size=3), random_rotation(rng)))
                break
    return clutter


_renderers = {}  # per process: a worker builds its renderer on its first job and keeps it


def renderer_for(cfg):
    sc = cfg.data.scenes
    size = frame_size(sc)
    models_dir = Path(sc.get("models_dir") or ASSETS)
    obj_ids = tuple(scene_objects(sc, load_models_info(models_dir.parent), models_dir))
    key = (str(models_dir), obj_ids, size, int(sc.spp), tuple(float(c) for c in cfg.data.camera.values()))
    if key not in _renderers:
        _renderers.clear()
        K = frame_intrinsics(cfg.data.camera, size)
        _renderers[key] = (SceneRenderer(models_dir, obj_ids, K, size, sc.spp), obj_ids)
    return _renderers[key]


def render_scene(job):
    """Render the frames of one scene, write their PNGs, return {im_id: (gt list, camera, gt_info list)}."""
    cfg, scene_id, scene_dir = job
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    (renderer, obj_ids), sc = renderer_for(cfg), cfg.data.scenes
    labels = {}
    for im_id in range(int(sc.images_per_scene)):
        rng = np.random.default_rng([int(sc.seed), scene_id, im_id])
        window = cluster_window(rng, sc, renderer.size)
        instances = sample_instances(rng, sc, renderer, obj_ids, window)
        clutter = sample_clutter(rng, sc, renderer, instances, window)
        centre = np.mean([t for _, _, t in instances], axis=0)
        light, ambient = sample_light(rng, sc.light, centre)
        background = sample_background(
            rng, list(sc.background.kinds), renderer.size, "data.scenes.background.kinds"
        )
        seed = scene_id * 100_000 + im_id
        image, depth, masks = renderer.render(instances, clutter, light, ambient, background, seed)
        name = f"{im_id:06d}"
        save_png(scene_dir / "rgb" / f"{name}.png", image)
        save_png(scene_dir / "depth" / f"{name}.png", np.round(depth / DEPTH_SCALE).astype(np.uint16))
        gts, infos = [], []
        for gt_id, ((obj_id, R, t), (mask, mask_visib)) in enumerate(zip(instances, masks, strict=True)):
            save_png(scene_dir / "mask" / f"{name}_{gt_id:06d}.png", mask.astype(np.uint8) * 255)
            save_png(scene_dir / "mask_visib" / f"{name}_{gt_id:06d}.png", mask_visib.astype(np.uint8) * 255)
            gts.append(
                {
                    "cam_R_m2c": [float(x) for x in R.reshape(-1)],
                    "cam_t_m2c": [float(x) for x in t],
                    "obj_id": obj_id,
                }
            )
            infos.append(gt_info(mask, mask_visib, depth))
        camera = {"cam_K": [float(x) for x in renderer.K.reshape(-1)], "depth_scale": DEPTH_SCALE}
        labels[im_id] = (gts, camera, infos)
    return labels


# --- the dataset --------------------------------------------------------------------------------------------


def worker_count(sc, jobs, frames):
    """data.scenes.workers: an int, or auto = one process per CPU core (at most one per scene), none below
    50 frames (starting a process costs several seconds, a 640x480 frame about one)."""
    workers = sc.get("workers", "auto")
    if workers == "auto":
        return min(os.cpu_count() or 1, jobs) if frames >= 50 else 0
    return int(workers)


def capture_scenes(cfg):
    """Render the scene dataset described by cfg.data into cfg.data.root, atomically. Returns (images,
    seconds)."""
    models_dir, _, obj_ids = validate(cfg)
    sc = cfg.data.scenes
    size = frame_size(sc)
    K = frame_intrinsics(cfg.data.camera, size)
    root = Path(cfg.data.root)
    for folder in sweep_stale_temp_dirs(root):
        print(f"capture: removed {folder}, the temporary folder of a capture that was killed", flush=True)
    plain_cfg = {"data": OmegaConf.to_container(cfg.data, resolve=True)}  # what a worker needs, picklable
    start = time.perf_counter()
    with atomic_dir(root) as tmp, contextlib.ExitStack() as stack:
        owner = tmp / OWNER_FILE
        owner.write_text(str(os.getpid()))
        shutil.copytree(models_dir, tmp / "models", ignore=shutil.ignore_patterns(".*"))
        height, width = size
        camera = {
            "cx": K[0, 2],
            "cy": K[1, 2],
            "fx": K[0, 0],
            "fy": K[1, 1],
            "width": width,
            "height": height,
        }
        (tmp / "camera.json").write_text(json.dumps(camera | {"depth_scale": DEPTH_SCALE}, indent=2) + "\n")
        jobs, scene_id = [], 0
        for split in SPLITS:
            for _ in range(int(sc.num_scenes[split])):
                scene_dir = tmp / str(cfg.data.splits[split]) / f"{scene_id:06d}"
                for sub in ("rgb", "depth", "mask", "mask_visib"):
                    (scene_dir / sub).mkdir(parents=True)
                jobs.append((split, (plain_cfg, scene_id, scene_dir)))
                scene_id += 1
        workers = worker_count(sc, len(jobs), len(jobs) * int(sc.images_per_scene))
        if workers > 1:
            # spawn: a fresh interpreter per worker (mitsuba and torch keep threads a fork would break)
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers))
            results = pool.imap(render_scene, [job for _, job in jobs])
        else:
            results = map(render_scene, [job for _, job in jobs])
        progress = stack.enter_context(
            tqdm(
                total=len(jobs) * int(sc.images_per_scene), desc="capture scenes", unit="img", file=sys.stdout
            )
        )
        detections = {split: [] for split in SPLITS}
        for (split, (_, scene_id, scene_dir)), labels in zip(jobs, results, strict=True):
            for name, index in (("scene_gt", 0), ("scene_camera", 1), ("scene_gt_info", 2)):
                data = {str(im_id): labels[im_id][index] for im_id in sorted(labels)}
                (scene_dir / f"{name}.json").write_text(json.dumps(data) + "\n")
            for im_id in sorted(labels):
                rng = np.random.default_rng([int(sc.seed), scene_id, im_id, 1])  # not the frame's stream
                gts, _, infos = labels[im_id]
                detections[split] += detections_for(
                    rng, sc.detections, scene_id, im_id, gts, infos, size, obj_ids
                )
            progress.update(len(labels))
        (tmp / "detections").mkdir()
        for split in SPLITS:
            path = tmp / "detections" / f"{cfg.data.splits[split]}.json"
            path.write_text(json.dumps(detections[split]) + "\n")
        owner.unlink()  # complete: atomic_dir moves it into place
    return len(jobs) * int(sc.images_per_scene), time.perf_counter() - start
