"""The deployment runtime that export, serve and the deployment benchmark share: the onnxruntime session,
the model's metadata, the file hash, and how latency is timed (once, here).
"""

import hashlib
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def open_session(path, intra_op_threads=2, graph_optimization="all", allow_spinning=False):
    """An onnxruntime CPU session with explicit threads, graph optimization level and thread spinning.

    Spinning worker threads shave a little off latency on an idle CPU but, when other processes share
    the cores (the web server itself, a robot's control loop), they steal time and inflate p95.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist (run: make export)")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise ValueError(
            f"deployment.graph_optimization={graph_optimization!r}; expected one of {sorted(levels)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_metadata(session):
    """The metadata_props written by export.py, plus the input size as ints."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [k for k in ("input_height", "input_width") if k not in meta]
    if missing:
        raise ValueError(f"ONNX model has no {missing} metadata; re-export it with deployment.export")
    return meta


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def time_calls(fn, warmup, runs):
    """Call fn warmup times, then runs times; the wall-clock milliseconds of each timed call."""
    for _ in range(int(warmup)):
        fn()
    times = []
    for _ in range(int(runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return np.array(times)


def latency_stats(ms):
    return {
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_mean": float(np.mean(ms)),
    }


def throughput(fn, n_images, warmup, runs):
    ms = time_calls(fn, warmup, runs)
    return float(n_images / (np.median(ms) / 1000))


def measure_latency(onnx_path, images, K, threads=2, warmup=10, runs=100, batch=32, **session_options):
    """onnxruntime latency at batch 1 (p50/p95/mean ms) and throughput at `batch` (images/s)."""
    session = open_session(onnx_path, threads, **session_options)
    one = {"image": images[:1].numpy(), "K": K[:1].numpy()}
    many = {"image": tile(images, batch).numpy(), "K": tile(K, batch).numpy()}
    stats = latency_stats(time_calls(lambda: session.run(None, one), warmup, runs))
    return {
        **stats,
        "throughput_ips": throughput(
            lambda: session.run(None, many), batch, max(1, warmup // 5), max(3, runs // 10)
        ),
        "batch": batch,
        "model_size_mb": Path(onnx_path).stat().st_size / 1e6,
        "intra_op_threads": int(threads),
    }


def tile(x, n):
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()
