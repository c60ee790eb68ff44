"""Production feedback: predict -> flag (API and CLI) -> load_service_log counts; concurrent appends stay whole."""

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image

from {{ cookiecutter.package_name }}.deployment import export, feedback, serve
from {{ cookiecutter.package_name }}.pose.model import PoseEstimator, build_model

SIZE = 32


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    cfg = OmegaConf.create(
        {
            "model": {"arch": "small_resnet", "width": 4, "depth": 1, "stages": 2, "pool": 2, "hidden": 16},
            "loss": {"rotation": "sixd", "translation": "centre_depth"},
            "data": {"image_size": SIZE},
        }
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    metadata = export.build_metadata((SIZE, SIZE), "sixd", "centre_depth", "test", 1, path, 18)
    export.export_onnx(PoseEstimator(build_model(cfg)).eval(), path, (SIZE, SIZE), 18, metadata)
    return path


def png(seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def post_predict(client, seed=0):
    data = {"fx": "40", "fy": "40", "cx": "15.5", "cy": "15.5"}
    r = client.post("/predict", files={"image": ("x.png", png(seed), "image/png")}, data=data)
    assert r.status_code == 200, r.text
    return r.json()


def test_predict_flag_and_summarize(model_path, tmp_path, capsys):
    log_path = tmp_path / "service_log.jsonl"
    app = serve.create_app(model_path, log_path, intra_op_threads=1, score_flag_below=0.0)
    with TestClient(app) as client:
        ids = [post_predict(client, seed)["id"] for seed in range(5)]
        r = client.post(f"/feedback/{ids[0]}", json={"reason": "pose mirrored"})
        assert r.status_code == 200 and r.json()["source"] == "api"
        assert client.post(f"/feedback/{ids[1]}").status_code == 200  # the reason is optional
        r = client.post("/feedback/" + "f" * 32, json={"reason": "x"})
        assert r.status_code == 404 and "no prediction" in r.json()["detail"]

    restarted = serve.create_app(
        model_path, log_path, intra_op_threads=1
    )  # ids from before: found in the log
    with TestClient(restarted) as client:
        assert client.post(f"/feedback/{ids[3]}", json={"reason": "late"}).status_code == 200

    assert feedback.main(["--log", str(log_path), "flag", ids[2], "--reason", "t off by 3 cm"]) == 0
    assert feedback.main(["--log", str(log_path), "flag", ids[0], "--reason", "again"]) == 0  # counted once
    assert feedback.main(["--log", str(log_path), "flag", "nope", "--reason", "x"]) == 1
    assert "nope" in capsys.readouterr().err

    summary = feedback.load_service_log(log_path)
    assert summary["n_predictions"] == 5 and summary["n_feedback"] == 5
    assert summary["n_flagged"] == 4 and summary["flagged_rate"] == pytest.approx(4 / 5)
    assert summary["n_flagged_by_user"] == 4 and summary["n_flagged_by_service"] == 0
    assert 0 < summary["service_latency_ms_p50"] <= summary["service_latency_ms_p95"]
    assert summary["n_bad_lines"] == 0 and summary["n_unknown_feedback"] == 0
    assert all(isinstance(v, int | float) for v in summary.values())

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    flagged = [r for r in records if r["type"] == "feedback" and r["id"] == ids[2]]
    assert flagged[0]["reason"] == "t off by 3 cm" and flagged[0]["source"] == "cli"

    assert feedback.main(["--log", str(log_path), "summary"]) == 0
    assert json.loads(capsys.readouterr().out)["n_flagged"] == 4


def test_the_service_flags_low_scores_itself(model_path, tmp_path):
    log_path = tmp_path / "service_log.jsonl"
    app = serve.create_app(
        model_path, log_path, intra_op_threads=1, score_flag_below=1.01
    )  # flags everything
    with TestClient(app) as client:
        answers = [post_predict(client, seed) for seed in range(3)]
    assert all(a["flagged"] for a in answers)
    summary = feedback.load_service_log(log_path)
    assert summary["n_flagged_by_service"] == 3 and summary["flagged_rate"] == 1.0


def test_concurrent_requests_and_appends_keep_every_line_whole(model_path, tmp_path):
    log_path = tmp_path / "service_log.jsonl"
    app = serve.create_app(model_path, log_path, intra_op_threads=1, score_flag_below=0.0)
    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda seed: post_predict(client, seed)["id"], range(24)))
    log = feedback.ServiceLog(log_path)
    long_reason = "x" * 20000  # longer than a pipe buffer: still one line

    def flag_many(worker):
        for i in range(50):
            log.append(feedback.feedback_record(ids[(worker + i) % len(ids)], long_reason, "api"))

    threads = [threading.Thread(target=flag_many, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    summary = feedback.load_service_log(log_path)
    assert summary["n_predictions"] == 24 and len(set(ids)) == 24
    assert summary["n_feedback"] == 400 and summary["n_bad_lines"] == 0 and summary["n_flagged"] == 24


def test_load_service_log_counts_torn_lines_and_needs_the_file(tmp_path):
    log_path = tmp_path / "service_log.jsonl"
    with pytest.raises(FileNotFoundError, match="make serve"):
        feedback.load_service_log(log_path)
    prediction = {"type": "prediction", "id": "a" * 32, "latency_ms": 4.0}
    log_path.write_text(json.dumps(prediction) + "\n" + '{"type": "feedback", "id": "' + "a" * 10)
    summary = feedback.load_service_log(log_path)
    assert summary["n_predictions"] == 1 and summary["n_bad_lines"] == 1 and summary["n_flagged"] == 0
    assert summary["service_latency_ms_p50"] == 4.0
