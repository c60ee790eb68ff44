"""The pose service: a valid request, input preprocessing, and a malformed-input fuzz (>= 500 requests, 0 5xx)."""

import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image

from {{ cookiecutter.package_name }}.deployment import export, serve
from {{ cookiecutter.package_name }}.pose.model import PoseEstimator, build_model

SIZE = 32
FX, CX = 40.0, (SIZE - 1) / 2
MAX_UPLOAD_MB = 0.05  # ~52 kB: oversize bodies are cheap to make
MAX_PIXELS = 512 * 512


def tiny_estimator(image_size=SIZE, seed=0):
    cfg = OmegaConf.create(
        {
            "model": {"arch": "small_resnet", "width": 4, "depth": 1, "stages": 2, "pool": 2, "hidden": 16},
            "loss": {"rotation": "sixd", "translation": "centre_depth"},
            "data": {"image_size": image_size},
        }
    )
    torch.manual_seed(seed)
    return PoseEstimator(build_model(cfg)).eval()


def encode(array, fmt="PNG", **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(h=SIZE, w=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def intrinsics(fx=FX, fy=FX, cx=CX, cy=CX):
    return {"fx": str(fx), "fy": str(fy), "cx": str(cx), "cy": str(cy)}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    metadata = export.build_metadata(
        (SIZE, SIZE), "sixd", "centre_depth", "test", 1, path.parent / "none.pt", 18
    )
    export.export_onnx(tiny_estimator(), path, (SIZE, SIZE), 18, metadata)
    return path


@pytest.fixture()
def app(model_path, tmp_path):
    return serve.create_app(
        model_path,
        tmp_path / "service_log.jsonl",
        max_upload_mb=MAX_UPLOAD_MB,
        max_image_pixels=MAX_PIXELS,
        intra_op_threads=1,
        score_flag_below=0.0,
    )


@pytest.fixture()
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def predict(client, image_bytes, data=None, filename="x.png", content_type="image/png"):
    files = {"image": (filename, image_bytes, content_type)}
    return client.post("/predict", files=files, data=intrinsics() if data is None else data)


def test_predict_returns_a_pose_and_logs_it(client, app, tmp_path):
    r = predict(client, encode(random_image()))
    assert r.status_code == 200, r.text
    body = r.json()
    R = np.array(body["R"])
    assert R.shape == (3, 3) and np.allclose(R @ R.T, np.eye(3), atol=1e-4) and np.linalg.det(R) > 0
    assert len(body["t_mm"]) == 3 and all(math.isfinite(v) for v in body["t_mm"])
    assert 0.0 <= body["score"] <= 1.0 and body["latency_ms"] > 0 and len(body["id"]) == 32
    # the answer is the model's: the same input through onnxruntime directly
    pixels = np.asarray(Image.open(io.BytesIO(encode(random_image()))), np.float32).transpose(2, 0, 1) / 255
    K = np.array([[FX, 0, CX], [0, FX, CX], [0, 0, 1]], np.float32)
    R_direct, t_direct = app.state.predictor.session.run(None, {"image": pixels[None], "K": K[None]})
    assert np.allclose(R, R_direct[0], atol=1e-5) and np.allclose(body["t_mm"], t_direct[0], atol=1e-3)
    records = [json.loads(line) for line in (tmp_path / "service_log.jsonl").read_text().splitlines()]
    assert records[-1]["id"] == body["id"] and records[-1]["type"] == "prediction"
    assert len(records[-1]["image_sha256"]) == 64


def test_health_reports_the_model_metadata(client):
    r = client.get("/health")
    assert r.status_code == 200
    meta = r.json()["metadata"]
    assert set(export.METADATA_KEYS) <= set(meta)
    assert meta["input_height"] == str(SIZE) and meta["rotation_representation"] == "sixd"


def test_jpeg_and_other_sizes_are_resized_with_scaled_intrinsics(client):
    big = np.kron(random_image(), np.ones((2, 2, 1), np.uint8))  # 64x64, same content
    r = predict(
        client, encode(big, "JPEG", quality=95), intrinsics(2 * FX, 2 * FX, 31.5, 40.0), "x.jpg", "image/jpeg"
    )
    assert r.status_code == 200, r.text
    K = np.array(r.json()["model_input"]["K"])
    # 64 -> 32 px: focal lengths halve, the principal point pivots on the -0.5 pixel-centre offset
    assert K[0, 0] == pytest.approx(FX) and K[1, 1] == pytest.approx(FX)
    assert K[0, 2] == pytest.approx(15.5) and K[1, 2] == pytest.approx(19.75)


FRAME_K = np.array([[150.0, 0.0, 81.3], [0.0, 151.5, 58.6], [0.0, 0.0, 1.0]])
BOX = [50, 30, 40, 24]


def one_frame_bop(root, frame):
    """A BOP dataset of one frame whose only instance has bbox_visib BOX: what training crops from."""
    scene = root / "test" / "000000"
    (scene / "rgb").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "models_info.json").write_text(json.dumps({"1": {"diameter": 100.0}}))
    Image.fromarray(frame).save(scene / "rgb" / "000000.png")
    pose = {"cam_R_m2c": np.eye(3).reshape(-1).tolist(), "cam_t_m2c": [0.0, 0.0, 400.0], "obj_id": 1}
    files = {
        "scene_gt": {"0": [pose]},
        "scene_camera": {"0": {"cam_K": FRAME_K.reshape(-1).tolist(), "depth_scale": 1.0}},
        "scene_gt_info": {"0": [{"bbox_visib": BOX, "bbox_obj": BOX, "visib_fract": 1.0}]},
    }
    for name, content in files.items():
        (scene / f"{name}.json").write_text(json.dumps(content))
    return root


def test_a_full_frame_with_a_box_is_cropped_as_training_crops_it(client, app, tmp_path):
    from {{ cookiecutter.package_name }}.data import bop

    # 4:3, not the model's 1:1; blocks of 2x2 pixels keep the PNG under the upload limit
    frame = np.kron(random_image(60, 80, seed=3), np.ones((2, 2, 1), np.uint8))
    fields = intrinsics(*FRAME_K[[0, 1, 0, 1], [0, 1, 2, 2]]) | dict(
        zip(serve.BOX_FIELDS, map(str, BOX), strict=True)
    )
    r = predict(client, encode(frame), fields)
    assert r.status_code == 200, r.text
    body = r.json()
    # the crop and its K are those the training loader makes from the same frame and box
    item = bop.BopDataset(
        one_frame_bop(tmp_path / "bop", frame), "test", 1, image_size=SIZE, crop={"pad": 1.5}
    )[0]
    np.testing.assert_allclose(body["model_input"]["K"], item["K"].numpy(), atol=1e-4)
    session = app.state.predictor.session
    R, t = session.run(None, {"image": item["image"][None].numpy(), "K": item["K"][None].numpy()})
    np.testing.assert_allclose(body["R"], R[0], atol=1e-5)
    np.testing.assert_allclose(body["t_mm"], t[0], atol=1e-3)
    # without a box the same frame is refused: its aspect is not the model's
    r = predict(client, encode(frame), intrinsics(*FRAME_K[[0, 1, 0, 1], [0, 1, 2, 2]]))
    assert r.status_code == 422 and "aspect" in r.text


def test_the_client_sends_the_box(client, tmp_path, monkeypatch):
    from {{ cookiecutter.package_name }}.deployment import client as client_module

    sent = []

    def post(url, files, data, timeout):
        sent.append(data)
        return client.post("/predict", files=files, data=data)

    monkeypatch.setattr(client_module.httpx, "post", post)
    path = tmp_path / "frame.png"
    path.write_bytes(encode(np.kron(random_image(60, 80, seed=3), np.ones((2, 2, 1), np.uint8))))
    fx, fy, cx, cy = FRAME_K[[0, 1, 0, 1], [0, 1, 2, 2]]
    assert client_module.main([str(path), "--fx", str(fx), "--fy", str(fy), "--cx", str(cx), "--cy", str(cy),
                               "--box", *map(str, BOX)]) == 0  # fmt: skip
    assert [float(sent[0][k]) for k in serve.BOX_FIELDS] == BOX
    # without the box the 4:3 frame is refused, and the client says why
    assert (
        client_module.main([str(path), "--fx", str(fx), "--fy", str(fy), "--cx", str(cx), "--cy", str(cy)])
        == 1
    )


@pytest.mark.parametrize(
    "box, message",
    [
        ({"box_x": "1", "box_y": "2", "box_w": "10"}, "missing box_h"),
        ({"box_x": "1", "box_y": "2", "box_w": "0", "box_h": "5"}, "positive width and height"),
        ({"box_x": "40", "box_y": "2", "box_w": "10", "box_h": "5"}, "outside the 32x32 image"),
        ({"box_x": "nan", "box_y": "2", "box_w": "10", "box_h": "5"}, "box_x=nan is not a finite number"),
        ({"box_x": "a", "box_y": "2", "box_w": "10", "box_h": "5"}, "box_x"),
    ],
)
def test_bad_boxes_are_422_naming_the_problem(client, box, message):
    r = predict(client, encode(random_image()), intrinsics() | box)
    assert r.status_code == 422 and message in r.text, r.text


def test_fit_to_input_rejects_another_aspect_ratio():
    img = Image.fromarray(random_image(32, 48))
    with pytest.raises(serve.BadInput, match="aspect"):
        serve.fit_to_input(img, np.eye(3), SIZE, SIZE, 0.02)
    resized, _ = serve.fit_to_input(img, np.eye(3), SIZE, SIZE, 100.0)  # tolerance lifted: stretched
    assert resized.size == (SIZE, SIZE)


def test_shifted_image_moves_content_and_principal_point():
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    moved, K = serve.shifted(image, np.eye(3, dtype=np.float32), 1)
    assert np.array_equal(moved[:, 1:, 1:], image[:, :3, :3]) and K[0, 2] == 1 and K[1, 2] == 1


def malformed_requests(seed=0):
    """(category, kwargs for client.request) of >= 500 malformed /predict requests."""
    rng = random.Random(seed)
    png = encode(random_image(seed=1))
    jpeg = encode(random_image(seed=2), "JPEG", quality=90)
    good = intrinsics()
    out = []

    def multipart(image_bytes, data=good, filename="x.png", content_type="image/png"):
        return {"files": {"image": (filename, image_bytes, content_type)}, "data": data}

    for _ in range(120):  # random bytes, some starting with a real signature
        n = rng.choice([0, 1, 7, 64, 1000, 20000])
        junk = bytes(rng.getrandbits(8) for _ in range(n))
        prefix = rng.choice([b"", png[:8], jpeg[:3], b"GIF89a"])
        out.append(("random bytes", multipart(prefix + junk)))
    for _ in range(120):  # truncated PNG / JPEG: cut inside the compressed pixel data
        data = rng.choice([png, jpeg])
        cut = rng.randint(0, len(data) - 64)
        out.append(
            ("truncated image", multipart(data[:cut], content_type=rng.choice(["image/png", "image/jpeg"])))
        )
    for ctype in [
        "text/plain",
        "application/json",
        "image/gif",
        "video/mp4",
        "application/pdf",
        "multipart/mixed",
    ]:
        for _ in range(8):  # wrong content type of the image part (the bytes are a valid PNG)
            out.append(("wrong part content type", multipart(png, content_type=ctype)))
    gif = io.BytesIO()
    Image.fromarray(random_image()).save(gif, format="GIF")
    bmp = io.BytesIO()
    Image.fromarray(random_image()).save(bmp, format="BMP")
    depth = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(depth, format="PNG")
    for other in (gif.getvalue(), bmp.getvalue(), depth.getvalue()):
        for _ in range(5):  # decodable, but not an 8-bit PNG or JPEG
            out.append(("other image format", multipart(other, content_type="application/octet-stream")))
    bad_values = ["nan", "NaN", "inf", "-inf", "0", "-1", "-1e-9", "abc", "", "1e400", "[1]", "0x10", "1,5"]
    for key in ("fx", "fy", "cx", "cy"):
        for value in bad_values:  # non-positive / non-finite / non-numeric intrinsics
            if key in ("cx", "cy") and value in ("0", "-1e-9"):
                continue  # inside the image: valid principal points
            out.append(("bad intrinsics", multipart(png, {**good, key: value})))
    for key, value in [("fx", "1e308"), ("fy", "1e-300"), ("fx", "1e5"), ("fy", "0.01")]:
        for _ in range(3):  # focal lengths no camera has for a 32 px image
            out.append(("implausible focal length", multipart(png, {**good, key: value})))
    for _ in range(5):  # two image parts
        two = [("image", ("a.png", png, "image/png")), ("image", ("b.jpg", jpeg, "image/jpeg"))]
        out.append(("two image parts", {"files": two, "data": good}))
    for key, value in [
        ("cx", "-0.6"),
        ("cx", "31.6"),
        ("cy", "-5"),
        ("cy", "1e6"),
        ("cx", "32"),
        ("cy", "100"),
    ]:
        for _ in range(3):  # principal point outside the image
            out.append(("principal point outside", multipart(png, {**good, key: value})))
    for key in ("fx", "fy", "cx", "cy"):
        for _ in range(5):  # a missing intrinsic
            out.append(("missing field", multipart(png, {k: v for k, v in good.items() if k != key})))
    for _ in range(10):  # no image part / image sent as a plain field
        out.append(("missing image", {"data": good}))
        out.append(("image as text field", {"data": {**good, "image": "not a file"}}))
    for _ in range(15):  # oversize bodies: with Content-Length, and streamed without one
        out.append(("oversize body", multipart(bytes(int(MAX_UPLOAD_MB * 2**20) + 1000))))
        big = png + bytes(int(MAX_UPLOAD_MB * 2**20))
        out.append(
            ("oversize chunked", {"content": iter([big[i : i + 8192] for i in range(0, len(big), 8192)])})
        )
    bomb = encode(np.zeros((1024, 1024, 3), np.uint8))  # 1 Mpx > MAX_PIXELS, compresses to a few kB
    for _ in range(10):  # too many pixels once decoded
        out.append(("pixel bomb", multipart(bomb)))
    for h, w in [(32, 48), (48, 32), (1, 2), (32, 16), (10, 200), (64, 33)]:
        for _ in range(4):  # wrong aspect ratio (sizes with the model's aspect are valid and get resized)
            other = encode(random_image(h, w))
            out.append(("wrong size", multipart(other, intrinsics(FX, FX, (w - 1) / 2, (h - 1) / 2))))
    for _ in range(10):  # bodies that are not multipart at all
        out.append(("json body", {"json": {"image": "aGVsbG8=", **good}}))
        out.append(("urlencoded body", {"data": good}))
        out.append(("raw png body", {"content": png, "headers": {"content-type": "image/png"}}))
        out.append(
            (
                "broken multipart",
                {"content": b"--xx\r\ngarbage", "headers": {"content-type": "multipart/form-data"}},
            )
        )
        out.append(
            (
                "bad boundary",
                {"content": png, "headers": {"content-type": "multipart/form-data; boundary=nope"}},
            )
        )
    for _ in range(5):
        out.append(("bad content-length", {"content": b"x", "headers": {"content-length": "abc"}}))
    return out


def test_fuzz_malformed_requests_get_4xx_and_the_server_stays_up(client):
    requests = malformed_requests()
    assert len(requests) >= 500
    failures = []
    for category, kwargs in requests:
        r = client.request("POST", "/predict", **kwargs)
        if not 400 <= r.status_code < 500 or "detail" not in r.json():
            failures.append((category, r.status_code, r.text[:200]))
    for _ in range(20):  # wrong method, unknown feedback ids, bad feedback bodies
        for method, url, kw in [
            ("GET", "/predict", {}),
            ("POST", "/feedback/" + "0" * 32, {"json": {"reason": "x"}}),
            (
                "POST",
                "/feedback/nope",
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
            ),
        ]:
            r = client.request(method, url, **kw)
            if not 400 <= r.status_code < 500:
                failures.append((url, r.status_code, r.text[:200]))
    assert not failures, failures[:10]
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert predict(client, encode(random_image())).status_code == 200


def test_grey_and_rgba_pngs_are_accepted(client):
    for array in (random_image()[..., 0], np.dstack([random_image(), np.full((SIZE, SIZE), 255, np.uint8)])):
        assert predict(client, encode(array)).status_code == 200


def test_error_messages_name_what_is_wrong(client):
    png = encode(random_image())
    assert "fx" in predict(client, png, {**intrinsics(), "fx": "-3"}).json()["detail"]
    assert "cy" in predict(client, png, {**intrinsics(), "cy": "99"}).json()["detail"]
    for field, value in [("fx", "1e308"), ("fy", "1e-3"), ("fx", "0.3"), ("fy", "3201")]:
        r = predict(client, png, {**intrinsics(), field: value})  # a 32 px image: fx, fy in 0.32..3200
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}={float(value)}"), r.text
        assert "focal length" in r.json()["detail"]
    for field, value in [("fx", "0.32"), ("fy", "3200")]:  # the generous bounds themselves are accepted
        assert predict(client, png, {**intrinsics(), field: value}).status_code == 200
    for field, value in [("cx", "-0.6"), ("cy", "31.6")]:
        r = predict(client, png, {**intrinsics(), field: value})
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}=") and "outside" in r.text
    assert "truncated" in predict(client, png[: len(png) // 2]).json()["detail"]
    r = predict(client, bytes(int(MAX_UPLOAD_MB * 2**20) + 1))
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    r = predict(client, png, content_type="text/plain")
    assert r.status_code == 415 and "content type" in r.json()["detail"]


def test_two_image_parts_are_rejected(client):
    a, b = encode(random_image(seed=1)), encode(random_image(seed=2))
    files = [("image", ("a.png", a, "image/png")), ("image", ("b.png", b, "image/png"))]
    r = client.post("/predict", files=files, data=intrinsics())
    assert r.status_code == 422 and "2 image parts" in r.json()["detail"], r.text
    one = client.post("/predict", files=files[:1], data=intrinsics())
    assert one.status_code == 200, one.text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_server_on_loopback_survives_malformed_requests(model_path, tmp_path):
    import httpx

    port = free_port()
    cmd = [
        sys.executable, "-m", "{{ cookiecutter.package_name }}.deployment.serve",
        f"paths.root={tmp_path}", f"deployment.onnx={model_path}", f"deployment.port={port}",
        f"deployment.max_upload_mb={MAX_UPLOAD_MB}", f"deployment.max_image_pixels={MAX_PIXELS}",
        "deployment.log_level=warning", "hydra.run.dir=" + str(tmp_path / "hydra"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            server.kill()
            raise AssertionError(f"server did not start: {server.communicate()[0].decode()[-2000:]}")
        failures = []
        with httpx.Client(base_url=url, timeout=10) as c:
            for category, kwargs in malformed_requests(seed=1)[::5]:
                try:
                    status = c.post("/predict", **kwargs).status_code
                except httpx.LocalProtocolError:  # httpx refuses to send it; sent raw below
                    if category != "bad content-length":
                        failures.append((category, "the client refused to send it"))
                    continue
                except httpx.HTTPError as e:
                    # the server may answer 413 and close the connection while an oversize upload is
                    # still being sent; any other dropped connection or timeout is a failure
                    if not category.startswith("oversize"):
                        failures.append((category, repr(e)))
                    continue
                if not 400 <= status < 500:
                    failures.append((category, status))
            assert not failures, failures[:10]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nx")
            status_line = raw.recv(4096).split(b"\r\n")[0]
            assert status_line.startswith(b"HTTP/1.1 4"), status_line
        with httpx.Client(base_url=url, timeout=10) as c:  # a fresh connection after the fuzz
            assert c.get("/health").status_code == 200
            ok = c.post(
                "/predict", files={"image": ("x.png", encode(random_image()), "image/png")}, data=intrinsics()
            )
            assert ok.status_code == 200, ok.text
        assert server.poll() is None
        assert (tmp_path / "5_deployment" / "service_log.jsonl").read_text().count('"prediction"') == 1
    finally:
        server.terminate()
        server.wait(timeout=20)
