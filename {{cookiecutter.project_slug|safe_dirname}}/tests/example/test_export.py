"""ONNX export: checker, dynamic batch, parity with eager PyTorch, metadata, atomic write, latency report."""

import json
import logging
import math

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose
from {{ cookiecutter.package_name }}.deployment import benchmark, export, runtime, serve
from {{ cookiecutter.package_name }}.pose.model import PoseEstimator, build_model

SIZE = (24, 32)  # H != W catches a swapped axis


def tiny_estimator(rotation="sixd", translation="centre_depth", seed=0, views=1):
    cfg = OmegaConf.create(
        {
            "model": {"arch": "small_resnet", "width": 4, "depth": 1, "stages": 2, "pool": 2, "hidden": 16},
            "loss": {"rotation": rotation, "translation": translation},
            "data": {"image_size": list(SIZE)},
        }
    )
    torch.manual_seed(seed)
    return PoseEstimator(build_model(cfg), views).eval()


def batch(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *SIZE, generator=generator)
    K = torch.tensor([[40.0, 0, 15.5], [0, 40.0, 11.5], [0, 0, 1]]).repeat(n, 1, 1)
    K[:, :2, 2] += torch.rand(n, 2, generator=generator) * 4 - 2  # the graph must use each sample's K
    return images, K


def metadata(tmp_path, rotation="sixd", translation="centre_depth"):
    return export.build_metadata(SIZE, rotation, translation, "test", 1, tmp_path / "ckpt.pt", 18)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    estimator = tiny_estimator()
    path = tmp / "model.onnx"
    export.export_onnx(estimator, path, SIZE, 18, metadata(tmp))
    return estimator, path


def test_the_exporter_logs_no_info_lines(tmp_path, caplog):
    """`make export` runs under Hydra's INFO root logger: the exporter's graph passes must not log every
    rewrite there (they did, over a hundred lines per export)."""
    caplog.set_level(logging.INFO)
    export.export_onnx(tiny_estimator(), tmp_path / "model.onnx", SIZE, 18, metadata(tmp_path))
    noisy = [
        r for r in caplog.records if r.levelno < logging.WARNING and r.name.startswith(("onnx", "torch"))
    ]
    assert not noisy, f"{len(noisy)} INFO lines, e.g. {noisy[0].name}: {noisy[0].getMessage()}"


def test_onnx_checker_passes_and_the_batch_axis_is_dynamic(exported):
    _, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    outputs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output
    }
    assert inputs == {"image": ["batch", 3, *SIZE], "K": ["batch", 3, 3]}
    assert outputs == {"R": ["batch", 3, 3], "t": ["batch", 3]}


@pytest.mark.parametrize("n", [1, 5])
def test_parity_with_eager_pytorch(exported, n):
    estimator, path = exported
    result = export.parity(estimator, path, *batch(n, seed=n), atol_R=1e-4, atol_t_mm=0.05, threads=1)
    assert result["n_images"] == n
    assert result["max_abs_diff_R"] <= 1e-4 and result["max_abs_diff_t_mm"] <= 0.05


def test_parity_fails_loudly_when_the_graph_is_another_model(exported):
    _, path = exported
    with pytest.raises(export.ParityError, match="differs from PyTorch"):
        export.parity(tiny_estimator(seed=1), path, *batch(4), atol_R=1e-4, atol_t_mm=0.05, threads=1)


@pytest.mark.slow  # each export takes several seconds; the default (sixd, centre_depth) is tested above
@pytest.mark.parametrize("rotation,translation", [("euler", "direct"), ("quaternion", "centre_depth")])
def test_other_representations_export_with_parity(tmp_path, rotation, translation):
    estimator = tiny_estimator(rotation, translation)
    path = tmp_path / "model.onnx"
    export.export_onnx(estimator, path, SIZE, 18, metadata(tmp_path, rotation, translation))
    export.parity(estimator, path, *batch(3), atol_R=1e-4, atol_t_mm=0.05, threads=1)


def test_test_time_views_export_with_parity(tmp_path):
    """model.test_views (the default model averages 8): the turns, the network over views x batch and the
    average are one ONNX graph, with the batch axis still dynamic."""
    estimator = tiny_estimator(views=4)
    path = tmp_path / "model.onnx"
    export.export_onnx(estimator, path, SIZE, 18, metadata(tmp_path))
    for n in (1, 3):
        export.parity(estimator, path, *batch(n, seed=n), atol_R=1e-4, atol_t_mm=0.05, threads=1)
    single = tiny_estimator(views=1)
    single.load_state_dict(estimator.state_dict())
    # the views do change the answer
    assert (single(*batch(3))[0] - estimator(*batch(3))[0]).abs().max() > 1e-3


def test_metadata_is_complete_and_read_by_the_service(exported):
    _, path = exported
    session = serve.open_session(path, 1)
    meta = serve.model_metadata(session)
    missing = [k for k in export.METADATA_KEYS if not meta.get(k)]
    assert not missing
    assert (int(meta["input_height"]), int(meta["input_width"])) == SIZE
    assert meta["channel_order"] == "RGB" and meta["rotation_representation"] == "sixd"
    assert meta["translation_mode"] == "centre_depth" and meta["opset"] == "18"
    assert "millimetres" in meta["translation_output"] and "OpenCV" in meta["intrinsics"]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, image, K):
            raise RuntimeError("cannot trace this")

    path = tmp_path / "model.onnx"
    with pytest.raises(Exception, match="cannot trace this"):
        export.export_onnx(Broken(), path, SIZE, 18, {})
    assert list(tmp_path.iterdir()) == []


def test_latency_report_is_a_flat_dict_of_numbers(exported):
    _, path = exported
    latency = export.measure_latency(path, *batch(4), threads=1, warmup=1, runs=5, batch=8)
    for key in ("latency_ms_p50", "latency_ms_p95", "latency_ms_mean", "throughput_ips", "model_size_mb"):
        assert isinstance(latency[key], float) and math.isfinite(latency[key]) and latency[key] > 0
    assert all(isinstance(v, int | float) for v in latency.values())
    assert latency["latency_ms_p50"] <= latency["latency_ms_p95"]
    assert latency["model_size_mb"] == pytest.approx(path.stat().st_size / 1e6)


def test_tile_repeats_a_batch_to_the_requested_size():
    x = torch.arange(3).view(3, 1)
    assert runtime.tile(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert np.array_equal(runtime.tile(x, 2).numpy(), x[:2].numpy())


def untrained_checkpoint(tiny_dataset, root):
    """A checkpoint in training's format (weights + resolved config) of an untrained tiny network."""
    tiny_model = ["model.width=4", "model.hidden=16", "model.stages=2"]
    cfg = compose(
        *tiny_dataset.overrides, *tiny_model, f"paths.root={root}", "logger=none", "experiment=smoke"
    )
    torch.manual_seed(0)
    state = {"model": build_model(cfg).state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}
    path = root / "3_training" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    fast = ["deployment.parity.n_images=4", "deployment.latency.warmup=1", "deployment.latency.runs=5"]
    return compose(*cfg_overrides(tiny_dataset, root), *fast), path


def cfg_overrides(tiny_dataset, root):
    return [*tiny_dataset.overrides, f"paths.root={root}", "logger=none", "experiment=smoke"]


def test_run_export_writes_model_report_and_latency(tiny_dataset, tmp_path):
    cfg, checkpoint = untrained_checkpoint(tiny_dataset, tmp_path)
    report, latency = export.run_export(cfg)
    out = tmp_path / "5_deployment"
    assert (out / "model.onnx").is_file() and report["parity"]["n_images"] == 4
    written = json.loads((out / "latency.json").read_text())
    assert written == latency and all(isinstance(v, int | float) for v in written.values())
    assert {"latency_ms_p50", "latency_ms_p95", "model_size_mb", "throughput_ips"} <= written.keys()
    meta = serve.model_metadata(serve.open_session(out / "model.onnx", 1))
    assert meta["input_height"] == "32" and meta["checkpoint_sha256"] == serve.sha256_file(checkpoint)
    assert meta["experiment"] == "smoke"
    assert json.loads((out / "export.json").read_text())["opset"] == 18
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "latency.json", "model.onnx"]


def test_run_export_names_a_missing_checkpoint(tmp_path):
    cfg = compose(f"paths.root={tmp_path}", "logger=none")
    with pytest.raises(FileNotFoundError, match="best.pt does not exist.*make train"):
        export.run_export(cfg)


@pytest.mark.slow
def test_benchmark_runs_eager_onnxruntime_and_http_in_one_run(tiny_dataset, tmp_path):
    cfg, _ = untrained_checkpoint(tiny_dataset, tmp_path)
    export.run_export(cfg)
    small = ["deployment.benchmark.warmup=1", "deployment.benchmark.runs=5", "deployment.benchmark.batch=4"]
    http = ["deployment.benchmark.clients=2", "deployment.benchmark.requests=10"]
    cfg = compose(*cfg_overrides(tiny_dataset, tmp_path), *small, *http)
    report = benchmark.run_benchmark(cfg, overrides=[f"paths.root={tmp_path}", "logger=none"])
    assert report["http"]["requests"] == 10 and report["http"]["errors"] == 0, report["http"]
    assert report["http_1_client"]["requests"] == 2 and report["http_1_client"]["errors"] == 0
    assert len(report["session_options"]) == 12
    # both runtimes were measured, and the speed-ups are eager over onnxruntime of those measurements
    eager, ort = report["eager"], report["onnxruntime"]
    for stats in (eager, report["eager_1_thread"], ort):
        assert 0 < stats["latency_ms_p50"] <= stats["latency_ms_p95"] and stats["throughput_ips"] > 0, stats
    assert report["speedup_p50"] == pytest.approx(eager["latency_ms_p50"] / ort["latency_ms_p50"])
    assert report["speedup_p95"] == pytest.approx(eager["latency_ms_p95"] / ort["latency_ms_p95"])
    assert report["speedup_throughput"] == pytest.approx(ort["throughput_ips"] / eager["throughput_ips"])
    best_eager = min(eager["latency_ms_p50"], report["eager_1_thread"]["latency_ms_p50"])
    assert report["speedup_p50_vs_best_eager"] == pytest.approx(best_eager / ort["latency_ms_p50"])
    assert json.loads((tmp_path / "5_deployment" / "benchmark.json").read_text())["http"]["requests"] == 10
    assert not (
        tmp_path / "5_deployment" / "service_log.jsonl"
    ).exists()  # load tests stay out of production's log
