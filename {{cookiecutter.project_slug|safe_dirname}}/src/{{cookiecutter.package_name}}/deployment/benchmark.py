"""Stage 5 benchmark: eager PyTorch vs onnxruntime, and the HTTP service under load, in one run.

    python -m <package>.deployment.benchmark experiment=<name>     # after make train and make export

On `deployment.intra_op_threads` CPU threads (2: the robot's CPU) it measures, on real test images:
1. latency p50/p95 at batch 1 and throughput at batch `deployment.benchmark.batch` (32) for eager
   PyTorch (the checkpoint; at those threads and at 1 thread) and onnxruntime (5_deployment/model.onnx),
   and the speed-up ratio eager / onnxruntime (target >= 1.5 at batch 1);
2. onnxruntime at batch 1 for each graph optimization level x intra-op thread count x thread
   spinning, to show which session options matter;
3. the service over HTTP on loopback: `deployment.serve` in a subprocess on a free 127.0.0.1 port
   (its own temp service log, so production's log stays clean); first one client (requests/4), then
   `benchmark.clients` concurrent httpx clients posting PNGs until `benchmark.requests` requests or
   `benchmark.seconds` -> requests/s, p50/p95 latency seen by the client, error count (anything but
   200 is an error; the command exits 1 when there is one).

Prints a table and writes 5_deployment/benchmark.json. Timing numbers depend on what else the machine
runs; the ratios are measured in the same run, so they compare like with like.
"""

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig

from ..checkpoints import load_model
from ..files import write_json
from ..paths import CONFIG_DIR
from .export import test_batch
from .runtime import latency_stats, measure_latency, open_session, throughput, tile, time_calls

TARGET_SPEEDUP = 1.5


def compare_runtimes(estimator, onnx_path, images, K, threads, warmup, runs, batch, **session_options):
    """Eager PyTorch vs onnxruntime (the service's session options): batch-1 latency, throughput, ratios."""
    torch.set_num_threads(int(threads))
    one_t, many_t = (images[:1], K[:1]), (tile(images, batch), tile(K, batch))
    batch_runs = max(3, runs // 10)
    # eager at 1 thread too: PyTorch's OpenMP threads degrade badly when other processes share the
    # cores, and the ratio should not credit onnxruntime for that alone
    eager_by_threads = {}
    with torch.inference_mode():
        for n in sorted({1, int(threads)}, reverse=True):
            torch.set_num_threads(n)
            stats = latency_stats(time_calls(lambda: estimator(*one_t), warmup, runs))
            stats["throughput_ips"] = throughput(
                lambda: estimator(*many_t), batch, max(1, warmup // 5), batch_runs
            )
            eager_by_threads[n] = stats
    torch.set_num_threads(int(threads))
    eager = eager_by_threads[int(threads)]
    best = min(eager_by_threads.values(), key=lambda s: s["latency_ms_p50"])
    ort_ = measure_latency(onnx_path, images, K, threads, warmup, runs, batch, **session_options)
    return {
        "eager": eager,
        "eager_1_thread": eager_by_threads[1],
        "onnxruntime": ort_,
        "speedup_p50": eager["latency_ms_p50"] / ort_["latency_ms_p50"],
        "speedup_p95": eager["latency_ms_p95"] / ort_["latency_ms_p95"],
        "speedup_throughput": ort_["throughput_ips"] / eager["throughput_ips"],
        "speedup_p50_vs_best_eager": best["latency_ms_p50"] / ort_["latency_ms_p50"],
    }


def session_options_sweep(onnx_path, images, K, max_threads, warmup, runs):
    """onnxruntime batch-1 p50/p95 per graph optimization level, intra-op thread count and spinning."""

    one = {"image": images[:1].numpy(), "K": K[:1].numpy()}
    rows = []
    for level in ("disable", "basic", "extended", "all"):
        for threads in sorted({1, int(max_threads)}):
            for spinning in (False, True) if threads > 1 else (False,):
                session = open_session(onnx_path, threads, level, spinning)
                stats = latency_stats(time_calls(lambda s=session: s.run(None, one), warmup, runs))
                rows.append(
                    {
                        "graph_optimization": level,
                        "intra_op_threads": threads,
                        "allow_spinning": spinning,
                        **stats,
                    }
                )
    return rows


def png_bytes(image):
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(onnx_path, port, log_path, run_dir, overrides=()):
    """`python -m <package>.deployment.serve` on 127.0.0.1:port; returns the process once /health answers."""
    import httpx

    module = f"{__package__}.serve"
    cmd = [
        sys.executable, "-m", module, *overrides,
        f"deployment.onnx={Path(onnx_path).resolve()}", "deployment.host=127.0.0.1", f"deployment.port={port}",
        f"deployment.service_log={log_path}", "deployment.log_level=warning", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.25)
    server.kill()
    output = server.communicate()[0].decode(errors="replace")
    raise RuntimeError(f"the service did not start on port {port}:\n{output[-3000:]}")


async def http_load(url, payloads, clients, max_requests, seconds):
    """`clients` concurrent clients post payloads round-robin until max_requests are sent or time is up."""
    import httpx

    latencies, errors, sent = [], [], 0
    deadline = time.perf_counter() + seconds

    async def client(worker, http):
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            image, data = payloads[sent % len(payloads)]
            sent += 1
            start = time.perf_counter()
            try:
                r = await http.post("/predict", files={"image": ("image.png", image, "image/png")}, data=data)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append((time.perf_counter() - start) * 1000)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "errors": len(errors),
        "first_errors": errors[:5],
    }


def run_benchmark(cfg, overrides=()):

    d, b = cfg.deployment, cfg.deployment.benchmark
    onnx_path = Path(d.onnx)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"deployment.onnx {onnx_path} does not exist (run: make export)")
    checkpoint = Path(d.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"deployment.checkpoint {checkpoint} does not exist (run: make train)")
    estimator, train_cfg = load_model(checkpoint)
    images, K = test_batch(cfg, train_cfg, max(int(b.batch), 1))
    threads = int(d.intra_op_threads)
    session_options = {"graph_optimization": d.graph_optimization, "allow_spinning": d.allow_spinning}
    runtimes = compare_runtimes(
        estimator.eval(), onnx_path, images, K, threads, b.warmup, b.runs, b.batch, **session_options
    )
    sweep = session_options_sweep(onnx_path, images, K, threads, b.warmup, max(10, b.runs // 2))
    payloads = [
        (png_bytes(image), {"fx": str(k[0][0]), "fy": str(k[1][1]), "cx": str(k[0][2]), "cy": str(k[1][2])})
        for image, k in zip(images, K.tolist(), strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="serve-benchmark-") as tmp:
        port = free_port()
        server = start_service(
            onnx_path, port, Path(tmp) / "service_log.jsonl", Path(tmp) / "hydra", overrides
        )
        try:
            url = f"http://127.0.0.1:{port}"
            # one client first: the latency one caller sees (a robot's control loop), no queueing
            single = asyncio.run(
                http_load(url, payloads, 1, max(1, int(b.requests) // 4), float(b.seconds) / 4)
            )
            http = asyncio.run(http_load(url, payloads, int(b.clients), int(b.requests), float(b.seconds)))
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    report = {
        "intra_op_threads": threads,
        **session_options,
        "batch": int(b.batch),
        **runtimes,
        "target_speedup": TARGET_SPEEDUP,
        "session_options": sweep,
        "http_1_client": single,
        "http": http,
    }
    write_json(Path(cfg.paths.deployment) / "benchmark.json", report)
    return report


def print_report(report, path):
    n, threads = report["batch"], report["intra_op_threads"]
    print(f"runtime (CPU)                     p50 ms   p95 ms   batch {n} images/s")
    for label, s in [
        (f"eager PyTorch, {threads} threads", report["eager"]),
        ("eager PyTorch, 1 thread", report["eager_1_thread"]),
        (f"onnxruntime, {threads} threads", report["onnxruntime"]),
    ]:
        print(
            f"  {label:<30} {s['latency_ms_p50']:8.2f} {s['latency_ms_p95']:8.2f} {s['throughput_ips']:12.0f}"
        )
    verdict = "meets" if report["speedup_p50_vs_best_eager"] >= report["target_speedup"] else "MISSES"
    print(
        f"  speed-up eager/onnxruntime at {threads} threads: p50 {report['speedup_p50']:.2f}x, "
        f"p95 {report['speedup_p95']:.2f}x, throughput {report['speedup_throughput']:.2f}x; p50 vs the faster "
        f"eager setting {report['speedup_p50_vs_best_eager']:.2f}x ({verdict} the {report['target_speedup']}x target)"
    )
    print("onnxruntime session options (batch 1)   p50 ms   p95 ms")
    for row in report["session_options"]:
        spin = ", spinning" if row["allow_spinning"] else ""
        label = f"{row['graph_optimization']}, {row['intra_op_threads']} thread(s){spin}"
        print(f"  {label:<36} {row['latency_ms_p50']:8.2f} {row['latency_ms_p95']:8.2f}")
    for h in (report["http_1_client"], report["http"]):
        print(
            f"HTTP /predict on loopback, {h['clients']} client(s): {h['requests']} requests in {h['seconds']:.1f} s "
            f"= {h['requests_per_s']:.1f} req/s, p50 {h['latency_ms_p50']:.1f} ms, p95 {h['latency_ms_p95']:.1f} ms, "
            f"{h['errors']} errors"
        )
        for err in h["first_errors"]:
            print(f"  error: {err}")
    print(f"wrote {path}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
    overrides = []
    if HydraConfig.initialized():  # pass the user's overrides on to the service, minus what we set
        mine = (
            "deployment.onnx=",
            "deployment.port=",
            "deployment.host=",
            "deployment.service_log=",
            "hydra.",
        )
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(mine)]
    try:
        report = run_benchmark(cfg, overrides)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        sys.exit(1)
    print_report(report, Path(cfg.paths.deployment) / "benchmark.json")
    if report["http"]["errors"] or report["http_1_client"]["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
