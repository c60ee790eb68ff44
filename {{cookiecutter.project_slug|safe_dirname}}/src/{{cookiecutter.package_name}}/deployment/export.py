"""Stage 5: export the trained pose model to ONNX, check it, prove parity, measure its latency.

    python -m <package>.deployment.export experiment=<name>      # make export

1. loads `deployment.checkpoint` (3_training/checkpoints/best.pt, torch.load(weights_only=True)) with
   checkpoints.load_model -> PoseEstimator;
2. exports `PoseEstimator(image, K) -> (R, t)` with torch.onnx's torch.export-based exporter at opset
   `deployment.opset` (18): inputs `image` float32 [batch, 3, H, W] RGB in [0, 1] (the ImageNet
   normalization is inside the graph) and `K` float32 [batch, 3, 3]; outputs `R` float32 [batch, 3, 3]
   (model -> camera) and `t` float32 [batch, 3] (mm). Only the batch axis is dynamic; H and W are fixed
   to the training input size;
3. embeds what inference needs as metadata_props (METADATA_KEYS below), so the service reads nothing
   from the training config, and runs onnx.checker (full_check);
4. runs eager PyTorch and onnxruntime on `deployment.parity.n_images` test images and fails (exit 1,
   nothing written) when max |R_onnx - R_torch| > parity.atol_R or max |t_onnx - t_torch| >
   parity.atol_t_mm;
5. writes 5_deployment/model.onnx atomically, 5_deployment/export.json (parity, opset, size, metadata)
   and 5_deployment/latency.json: onnxruntime on `deployment.intra_op_threads` CPU threads, a flat dict of
   numbers: latency_ms_p50, latency_ms_p95, latency_ms_mean (batch 1), throughput_ips (images/s at
   batch `deployment.latency.batch`, 32), model_size_mb, intra_op_threads. The metric review checks
   these keys against 1_planning/requirements.yaml.

Checklist: 5_deployment/CHECKLIST.md (export + parity, latency vs requirement).
"""

import contextlib
import io
import logging
import subprocess
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import hydra
import numpy as np
import onnx
import torch

from .. import tracking
from ..checkpoints import load_model
from ..files import atomic_path, write_json
from ..paths import CONFIG_DIR, PROJECT_ROOT
from ..pose import losses
from .runtime import measure_latency, open_session, sha256_file

INPUT_NAMES = ("image", "K")
OUTPUT_NAMES = ("R", "t")
# metadata_props every exported model carries (all strings); tests and the service check them.
METADATA_KEYS = (
    "input_height",
    "input_width",
    "input_layout",
    "channel_order",
    "value_range",
    "normalization",
    "intrinsics",
    "input_mode",
    "crop_pad",
    "rotation_representation",
    "rotation_output",
    "test_views",
    "translation_mode",
    "translation_output",
    "experiment",
    "obj_id",
    "checkpoint",
    "checkpoint_sha256",
    "git_commit",
    "opset",
    "exported_at",
    "torch_version",
)


class ParityError(RuntimeError):
    pass


def export_onnx(estimator, path, input_size, opset=18, metadata=None):
    """Export estimator(image, K) -> (R, t) to `path` (atomic) with a dynamic batch axis; return the ModelProto."""
    height, width = input_size
    estimator = estimator.eval()
    # batch 2 in the example input so the exporter does not specialize the batch axis to 1
    image = torch.rand(2, 3, height, width)
    K = torch.tensor([[width, 0.0, (width - 1) / 2], [0.0, width, (height - 1) / 2], [0.0, 0.0, 1.0]])
    batch = torch.export.Dim("batch", min=1, max=4096)
    progress = io.StringIO()  # the exporter prints its steps; keep them out of the command's output
    # and its graph passes log each rewrite at INFO (onnxscript 0.7, onnx_ir 1.1): under Hydra's INFO root
    # logger that is over a hundred lines in `make export`
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad(), contextlib.redirect_stdout(progress), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        program = torch.onnx.export(
            estimator,
            (image, K.expand(2, 3, 3).contiguous()),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=int(opset),
            dynamic_shapes={"image": {0: batch}, "K": {0: batch}},
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=str(key), value=str(value))
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return model


def parity(estimator, onnx_path, images, K, atol_R, atol_t_mm, threads=2):
    """Eager PyTorch vs onnxruntime on the same batch: max abs differences; ParityError above tolerance."""
    with torch.no_grad():
        R_torch, t_torch = estimator.eval()(images, K)
    session = open_session(onnx_path, threads)
    R_onnx, t_onnx = session.run(list(OUTPUT_NAMES), {"image": images.numpy(), "K": K.numpy()})
    result = {
        "n_images": int(images.shape[0]),
        "max_abs_diff_R": float(np.abs(R_onnx - R_torch.numpy()).max()),
        "max_abs_diff_t_mm": float(np.abs(t_onnx - t_torch.numpy()).max()),
        "atol_R": float(atol_R),
        "atol_t_mm": float(atol_t_mm),
    }
    if not (result["max_abs_diff_R"] <= atol_R and result["max_abs_diff_t_mm"] <= atol_t_mm):
        raise ParityError(
            f"ONNX output differs from PyTorch on {result['n_images']} images: max |dR| = "
            f"{result['max_abs_diff_R']:.3g} (tolerance {atol_R}), max |dt| = {result['max_abs_diff_t_mm']:.3g} mm "
            f"(tolerance {atol_t_mm}); the export changed the model's behaviour"
        )
    return result


def git_commit(root=PROJECT_ROOT):
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


NORMALIZED_IN_GRAPH = "inside the graph (ImageNet mean/std); send plain [0, 1] pixels"
NOT_NORMALIZED = "none: the network was trained on plain [0, 1] pixels (model.normalize_input=false)"


def build_metadata(
    input_size,
    rotation,
    translation,
    experiment,
    obj_id,
    checkpoint,
    opset,
    normalization=NORMALIZED_IN_GRAPH,
    input_mode="frame",
    crop_pad=1.5,
    test_views=1,
):
    height, width = input_size
    checkpoint = Path(checkpoint)
    return {
        "input_height": height,
        "input_width": width,
        "input_layout": "NCHW float32, batch axis dynamic",
        "channel_order": "RGB",
        "value_range": "[0, 1] (uint8 / 255)",
        "normalization": normalization,
        "intrinsics": (
            "K [batch,3,3] OpenCV pinhole in pixels of the model input (input_width x input_height), "
            "pixel centres at integer coordinates; resizing an image by (sx, sy) maps fx -> fx*sx, "
            "cx -> (cx+0.5)*sx-0.5 (likewise fy, cy with sy)"
        ),
        "input_mode": (
            "crop: the model sees a square window of crop_pad x the object's box [x, y, w, h], centred on it, "
            "resized to the input (data/crop.py; the service crops when sent a box)"
            if input_mode == "crop"
            else "frame: the model sees the whole image resized to the input"
        ),
        "crop_pad": crop_pad,
        "rotation_representation": rotation,
        "rotation_output": "R [batch,3,3] rotation matrix, model frame -> OpenCV camera frame (BOP cam_R_m2c)",
        "test_views": test_views,  # the graph averages this many turned views of each image (model.test_views)
        "translation_mode": translation,
        "translation_output": "t [batch,3] model origin in the OpenCV camera frame, millimetres (BOP cam_t_m2c)",
        "experiment": experiment,
        "obj_id": obj_id,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint.is_file() else "unknown",
        "git_commit": git_commit(),
        "opset": opset,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
        "torch_version": torch.__version__,
    }


def test_batch(cfg, train_cfg, n):
    """The first n test inputs of the configured BOP dataset as the model was trained on them (crops or
    resized frames, train_cfg.data), with their K."""
    from ..data.bop import dataset_from_config

    dataset = dataset_from_config(cfg.data, cfg.data.splits.test, "test", trained=train_cfg.data)
    items = [dataset[i] for i in range(min(int(n), len(dataset)))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["K"] for it in items])


def run_export(cfg):
    d = cfg.deployment
    checkpoint = Path(d.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"deployment.checkpoint {checkpoint} does not exist (run: make train)")
    estimator, train_cfg = load_model(checkpoint)
    estimator = estimator.eval().cpu()
    size = train_cfg.data.image_size
    input_size = (int(size), int(size))
    metadata = build_metadata(
        input_size,
        losses.rotation_of(train_cfg.loss),
        train_cfg.loss.translation,
        tracking.experiment_name(cfg),
        train_cfg.data.obj_id,
        checkpoint,
        d.opset,
        NORMALIZED_IN_GRAPH if getattr(estimator.net, "normalize_input", True) else NOT_NORMALIZED,
        input_mode=train_cfg.data.get("input", "frame"),
        crop_pad=float((train_cfg.data.get("crop") or {}).get("pad", 1.5)),
        test_views=getattr(estimator, "views", 1),
    )
    images, K = test_batch(cfg, train_cfg, max(int(d.parity.n_images), 1))
    torch.set_num_threads(int(d.intra_op_threads))
    onnx_path = Path(d.onnx)
    out_dir = Path(cfg.paths.deployment)
    # export and check under a temp name beside the target: a model that fails parity never replaces the old one
    with atomic_path(onnx_path) as candidate:
        export_onnx(estimator, candidate, input_size, d.opset, metadata)
        check = parity(
            estimator, candidate, images, K, d.parity.atol_R, d.parity.atol_t_mm, d.intra_op_threads
        )
        latency = measure_latency(
            candidate,
            images,
            K,
            d.intra_op_threads,
            d.latency.warmup,
            d.latency.runs,
            d.latency.batch,
            graph_optimization=d.graph_optimization,
            allow_spinning=d.allow_spinning,
        )
    report = {
        "onnx": str(onnx_path),
        "opset": int(d.opset),
        "inputs": {"image": ["batch", 3, *input_size], "K": ["batch", 3, 3]},
        "outputs": {"R": ["batch", 3, 3], "t": ["batch", 3]},
        "dynamic_axes": {
            "image": {"0": "batch"},
            "K": {"0": "batch"},
            "R": {"0": "batch"},
            "t": {"0": "batch"},
        },
        "model_size_mb": latency["model_size_mb"],
        "model_sha256": sha256_file(onnx_path),
        "parity": check,
        "metadata": {k: str(v) for k, v in metadata.items()},
    }
    write_json(out_dir / "export.json", report)
    write_json(out_dir / "latency.json", latency)
    return report, latency


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    run = tracking.start_run(cfg, "deployment")
    try:
        report, latency = run_export(cfg)
    except (FileNotFoundError, ValueError, KeyError, ParityError, RuntimeError, OSError) as e:
        print(f"export: {e}", file=sys.stderr)
        run.finish()
        sys.exit(1)
    run.log(
        {f"export/{k}": v for k, v in latency.items()}
        | {f"export/parity_{k}": v for k, v in report["parity"].items()}
    )
    run.finish()
    p = report["parity"]
    print(f"wrote {report['onnx']} (opset {report['opset']}, {report['model_size_mb']:.2f} MB)")
    print(
        f"parity on {p['n_images']} test images: max |dR| {p['max_abs_diff_R']:.2e} (<= {p['atol_R']}), "
        f"max |dt| {p['max_abs_diff_t_mm']:.2e} mm (<= {p['atol_t_mm']})"
    )
    print(
        f"onnxruntime, {latency['intra_op_threads']} threads: batch 1 p50 {latency['latency_ms_p50']:.2f} ms, "
        f"p95 {latency['latency_ms_p95']:.2f} ms; batch {latency['batch']} {latency['throughput_ips']:.0f} images/s"
    )
    print(
        f"wrote {Path(cfg.paths.deployment) / 'export.json'} and latency.json (checklist: 5_deployment/CHECKLIST.md)"
    )


if __name__ == "__main__":
    main()
