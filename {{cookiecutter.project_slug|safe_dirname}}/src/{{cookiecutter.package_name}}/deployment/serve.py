"""Stage 5: the pose service - FastAPI over onnxruntime, one InferenceSession created at startup.

    python -m <package>.deployment.serve                      # 127.0.0.1:8000 (deployment.host/port)
    curl -F image=@rgb.png -F fx=572.4 -F fy=573.6 -F cx=325.3 -F cy=242.0 http://127.0.0.1:8000/predict
    curl ... -F box_x=300 -F box_y=200 -F box_w=80 -F box_h=64 http://127.0.0.1:8000/predict   # a full frame

Endpoints:
- `POST /predict` (multipart/form-data): `image` (PNG or JPEG file) and `fx`, `fy`, `cx`, `cy`, the
  OpenCV pinhole intrinsics of the image *as sent*, in its pixels. Answers `id`, `R` (3x3, model to
  camera), `t_mm` (3), `score`, `latency_ms`, `model_input` (the size and K the model saw).
  With a box (`box_x`, `box_y`, `box_w`, `box_h`: the object's box [x, y, w, h] in pixels of the sent
  image, e.g. from a detector), the image is a full frame of any size and aspect: the service cuts the
  zoomed-in square crop around the box that training cut (data/crop.py, `crop_pad` from the model's
  metadata) and the pose is in the sent frame's camera.
- `GET /health`: status and the model's metadata (everything inference needs travels in model.onnx).
- `POST /feedback/{id}` (JSON `{"reason": "..."}`, optional): flag a prediction as wrong.

Without a box, images of another size are resized to the model input size (PIL bilinear, antialiased like the
training loader's torchvision resize) and K is scaled with them the way BopDataset does (pixel
centres at integer coordinates): fx *= sx, cx = (cx + 0.5) * sx - 0.5, likewise fy, cy with sy. The aspect ratio must match the model's within
`deployment.aspect_tolerance` (relative); otherwise the request is rejected with 422 rather than
distorted or padded: crop to the model's aspect ratio on the client, where the crop offset is known
and cx, cy can be shifted by it.

`score` is an agreement score, not a calibrated probability: the model runs on the image and on a
copy shifted by `deployment.score.shift_px` pixels with cx, cy shifted the same (the true pose is
identical), and score = exp(-(rotation difference / score.rot_deg + translation difference /
(score.rel_t * |t|))). 1 means the two predictions agree; shift_px=0 turns it off (score null).
A prediction scoring below `score.flag_below` is flagged by the service itself (a feedback record
with source "service", `flagged: true` in the answer), so the caller can re-capture.

Bad input is a 4xx naming what is wrong, and the server stays up: the body size is capped before
anything is parsed (413), non-image/truncated/oversized-in-pixels images are 400/413, other part
content types 415, missing or invalid intrinsics 422 (a focal length outside `FOCAL_FACTOR` times the
image side either way, a principal point outside the image), several `image` parts 422, a box given in
part, not finite, empty or outside the image 422. Every answered prediction is appended to the
service log (`deployment.service_log`, see feedback.py).
"""

import collections
import hashlib
import json
import math
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated

import hydra
import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from pydantic import BaseModel, Field

from ..paths import CONFIG_DIR
from .feedback import ServiceLog, feedback_record, has_prediction, utc_now
from .inputs import (  # noqa: F401 (the input checks, in inputs.py, are serve's API too: serve.fit_to_input)
    BOX_FIELDS,
    BadInput,
    check_box,
    check_intrinsics,
    crop_to_input,
    decode_image,
    fit_to_input,
    rotation_difference_deg,
    shifted,
)
from .runtime import model_metadata, open_session, sha256_file

# --- the service ---------------------------------------------------------------------------------


class Predictor:
    def __init__(self, session, score_shift_px=2, score_rot_deg=5.0, score_rel_t=0.05, max_concurrent=1):
        self.session = session
        # onnxruntime already spreads one run over intra_op_threads cores; more runs at once than the
        # CPU has room for only thrash, so requests queue here instead (decoding still runs in parallel)
        self.slots = threading.BoundedSemaphore(max(1, int(max_concurrent)))
        self.metadata = model_metadata(session)
        self.width = int(self.metadata["input_width"])
        self.height = int(self.metadata["input_height"])
        self.crop_pad = float(self.metadata.get("crop_pad", 1.5))
        self.score_shift_px = int(score_shift_px)
        self.score_rot_deg = float(score_rot_deg)
        self.score_rel_t = float(score_rel_t)

    def run(self, image, K):
        """image float32 [3,H,W] in [0,1], K [3,3] in model-input pixels -> (R, t_mm, score)."""
        images, Ks = [image], [K]
        if self.score_shift_px:
            moved, K_moved = shifted(image, K, self.score_shift_px)
            images.append(moved)
            Ks.append(K_moved)
        feed = {"image": np.stack(images), "K": np.stack(Ks).astype(np.float32)}
        with self.slots:
            R, t = self.session.run(["R", "t"], feed)
        score = None
        if self.score_shift_px:
            rot = rotation_difference_deg(R[0], R[1])
            rel = float(np.linalg.norm(t[0] - t[1]) / max(float(np.linalg.norm(t[0])), 1e-6))
            score = math.exp(-(rot / self.score_rot_deg + rel / self.score_rel_t))
        return R[0], t[0], score

    def warm_up(self):
        K = np.array(
            [[self.width, 0, self.width / 2], [0, self.width, self.height / 2], [0, 0, 1]], np.float32
        )
        self.run(np.full((3, self.height, self.width), 0.5, np.float32), K)


class BodySizeLimit:
    """ASGI middleware: refuse a request body over max_bytes (413) before any of it is parsed.

    Starlette's multipart parser has no total size limit for file parts, so the body is read here
    (Content-Length checked first, then counted while streaming) and replayed to the app.
    """

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await self.reject(send, 400, f"Content-Length {length!r} is not a number")
            if too_big:
                return await self.reject(send, 413, self.too_big_message())
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.reject(send, 413, self.too_big_message())
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def too_big_message(self):
        return f"request body is larger than {self.max_bytes} bytes (deployment.max_upload_mb)"

    @staticmethod
    async def reject(send, status, message):
        body = json.dumps({"detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RecentIds:
    """The ids of the last `size` predictions, so flagging a recent one needs no scan of the log."""

    def __init__(self, size=100_000):
        self.size = size
        self.ids = collections.OrderedDict()
        self.lock = threading.Lock()

    def add(self, prediction_id):
        with self.lock:
            self.ids[prediction_id] = None
            if len(self.ids) > self.size:
                self.ids.popitem(last=False)

    def __contains__(self, prediction_id):
        with self.lock:
            return prediction_id in self.ids


async def one_image_part(request: Request):
    """422 for a request with several `image` parts (FastAPI would silently take the last one)."""
    form = await request.form()  # the form FastAPI parsed for the endpoint (Starlette caches it)
    count = len(form.getlist("image"))
    if count > 1:
        raise HTTPException(422, f"the request has {count} image parts; send exactly one image per request")


class FeedbackIn(BaseModel):
    reason: str = Field("", max_length=2000)


def create_app(
    model_path,
    log_path,
    max_upload_mb=10.0,
    max_image_pixels=4096 * 4096,
    aspect_tolerance=0.02,
    intra_op_threads=2,
    graph_optimization="all",
    allow_spinning=False,
    score_shift_px=2,
    score_rot_deg=5.0,
    score_rel_t=0.05,
    score_flag_below=0.0,
    max_concurrent_inference=1,
):
    """The FastAPI app; the onnxruntime session is created here, once, and warmed up."""
    session = open_session(model_path, intra_op_threads, graph_optimization, allow_spinning)
    predictor = Predictor(session, score_shift_px, score_rot_deg, score_rel_t, max_concurrent_inference)
    predictor.warm_up()
    model_sha256 = sha256_file(model_path)
    log = ServiceLog(log_path)
    recent_ids = RecentIds()
    counts = {"predictions": 0, "rejected": 0}
    counts_lock = threading.Lock()

    def count(key):
        with counts_lock:
            counts[key] += 1

    @asynccontextmanager
    async def lifespan(app):
        yield
        log.close()

    app = FastAPI(
        title="pose estimation service", description=(__doc__ or "").split("\n\n")[0], lifespan=lifespan
    )
    app.add_middleware(BodySizeLimit, max_bytes=int(max_upload_mb * 1024 * 1024))
    app.state.predictor = predictor
    app.state.log = log

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "model_path": str(model_path),
            "model_sha256": model_sha256,
            "metadata": predictor.metadata,
            "max_upload_bytes": int(max_upload_mb * 1024 * 1024),
            "predictions_since_start": counts["predictions"],
            "rejected_since_start": counts["rejected"],
        }

    # A plain `def`: FastAPI runs it in its thread pool, so inference does not block the event loop.
    @app.post("/predict", dependencies=[Depends(one_image_part)])
    def predict(
        image: Annotated[UploadFile, File(description="PNG or JPEG")],
        fx: Annotated[float, Form(description="focal length x of the sent image, pixels")],
        fy: Annotated[float, Form(description="focal length y of the sent image, pixels")],
        cx: Annotated[float, Form(description="principal point x of the sent image, pixels")],
        cy: Annotated[float, Form(description="principal point y of the sent image, pixels")],
        box_x: Annotated[float | None, Form(description="object box left (pixel index), optional")] = None,
        box_y: Annotated[float | None, Form(description="object box top (pixel index), optional")] = None,
        box_w: Annotated[float | None, Form(description="object box width, pixels, optional")] = None,
        box_h: Annotated[float | None, Form(description="object box height, pixels, optional")] = None,
    ):
        start = time.perf_counter()
        data = image.file.read()
        try:
            img = decode_image(data, image.content_type, max_image_pixels)
            sent_size = img.size
            check_intrinsics(fx, fy, cx, cy, *sent_size)
            box = check_box((box_x, box_y, box_w, box_h), *sent_size)
            K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], np.float64)
            if box is None:
                img, K = fit_to_input(img, K, predictor.width, predictor.height, aspect_tolerance)
                pixels = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
            else:
                if predictor.width != predictor.height:
                    raise BadInput(422, "the model's input is not square: it takes no box crops")
                pixels, K = crop_to_input(img, K, box, predictor.width, predictor.crop_pad)
        except BadInput as e:
            count("rejected")
            raise HTTPException(e.status, e.message) from e
        R, t, score = predictor.run(np.ascontiguousarray(pixels), K.astype(np.float32))
        if not (np.isfinite(R).all() and np.isfinite(t).all()):
            count("rejected")
            raise HTTPException(422, f"the model's pose for this image is not finite (t_mm={t.tolist()})")
        latency_ms = (time.perf_counter() - start) * 1000
        record = {
            "type": "prediction",
            "id": uuid.uuid4().hex,
            "timestamp": utc_now(),
            "image_sha256": hashlib.sha256(data).hexdigest(),
            "image_size": list(sent_size),
            "K": {"fx": fx, "fy": fy, "cx": cx, "cy": cy},
            "box": box,
            "R": R.astype(float).tolist(),
            "t_mm": t.astype(float).tolist(),
            "score": score,
            "latency_ms": latency_ms,
            "model_sha256": model_sha256,
        }
        log.append(record)
        recent_ids.add(record["id"])
        count("predictions")
        flagged = score is not None and score < score_flag_below
        if flagged:
            log.append(feedback_record(record["id"], f"score {score:.3f} < {score_flag_below}", "service"))
        return {
            "id": record["id"],
            "R": record["R"],
            "t_mm": record["t_mm"],
            "score": score,
            "flagged": flagged,
            "latency_ms": latency_ms,
            "model_input": {"width": predictor.width, "height": predictor.height, "K": K.tolist()},
        }

    @app.post("/feedback/{prediction_id}")
    def feedback(prediction_id: str, body: FeedbackIn | None = None):
        # older ids (and those another process served) are looked up in the log itself
        if prediction_id not in recent_ids and not has_prediction(log_path, prediction_id):
            raise HTTPException(404, f"no prediction with id {prediction_id!r} in {log_path}")
        record = feedback_record(prediction_id, body.reason if body else "", "api")
        log.append(record)
        return record

    return app


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    d = cfg.deployment
    try:
        app = create_app(
            d.onnx,
            d.service_log,
            max_upload_mb=d.max_upload_mb,
            max_image_pixels=d.max_image_pixels,
            aspect_tolerance=d.aspect_tolerance,
            intra_op_threads=d.intra_op_threads,
            graph_optimization=d.graph_optimization,
            allow_spinning=d.allow_spinning,
            score_shift_px=d.score.shift_px,
            score_rot_deg=d.score.rot_deg,
            score_rel_t=d.score.rel_t,
            score_flag_below=d.score.flag_below,
            max_concurrent_inference=d.max_concurrent_inference,
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"serve: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"serving {d.onnx} on http://{d.host}:{d.port} (log: {d.service_log})", flush=True)
    uvicorn.run(app, host=str(d.host), port=int(d.port), log_level=str(d.log_level))


if __name__ == "__main__":
    main()
