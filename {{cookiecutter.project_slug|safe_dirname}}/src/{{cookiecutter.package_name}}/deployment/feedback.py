"""Production feedback: the service log and flagging wrong predictions.

The service appends one JSON line per prediction to `5_deployment/service_log.jsonl`:

    {"type": "prediction", "id": "<32 hex>", "timestamp": "<ISO 8601 UTC>", "image_sha256": "...",
     "image_size": [w, h], "K": {"fx":..,"fy":..,"cx":..,"cy":..}, "box": [x, y, w, h] or null,
     "R": [[3x3]], "t_mm": [3],
     "score": float, "latency_ms": float, "model_sha256": "..."}

A wrong prediction is flagged by appending a feedback record to the same file (append-only, the
prediction line is never rewritten):

    {"type": "feedback", "id": "<prediction id>", "timestamp": "...", "reason": "...",
     "source": "api" | "cli" | "service"}

"service" records are written by the service itself when a prediction's agreement score is below
`deployment.score.flag_below` (see serve.py); "api" and "cli" ones by people or downstream checks.

Flag from the service (`POST /feedback/{id}`) or from the command line:

    python -m <package>.deployment.feedback flag <id> --reason "mirrored pose"
    python -m <package>.deployment.feedback summary          # prints load_service_log() as JSON

`load_service_log(path) -> dict` summarizes the log for metric review (a flat dict of numbers):
`n_predictions`, `n_feedback`, `n_flagged` (distinct predictions flagged, by anyone),
`n_flagged_by_service`, `n_flagged_by_user` (flagged through the API/CLI and not by the service),
`flagged_rate` (n_flagged / n_predictions),
`service_latency_ms_p50`, `service_latency_ms_p95`, `n_unknown_feedback` (flags whose id is not
in the log), `n_bad_lines` (lines that are not valid records, e.g. a torn last line after a crash).
"""

import argparse
import json
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEFAULT_LOG = "5_deployment/service_log.jsonl"


def utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017 (UTC needs 3.11)


class ServiceLog:
    """Append-only JSON-lines log, safe under concurrent requests.

    Each record is written with one `os.write` on a file opened with O_APPEND, so a line lands
    whole and is in the kernel (flushed) when `append` returns, even with several processes
    writing; the lock keeps threads of one process from interleaving partial writes.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record):
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_records(path):
    """Yield the valid records of a service log; invalid lines are counted, not fatal."""
    bad = 0
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict) or record.get("type") not in ("prediction", "feedback"):
                bad += 1
                continue
            records.append(record)
    return records, bad


def has_prediction(path, prediction_id):
    """Whether the log holds a prediction with this id (streams the file: feedback is rare, logs are long)."""
    path = Path(path)
    if not path.is_file() or not prediction_id:
        return False
    needle = json.dumps(str(prediction_id))
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if needle not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (
                isinstance(record, dict)
                and record.get("type") == "prediction"
                and record.get("id") == prediction_id
            ):
                return True
    return False


def load_service_log(path):
    """Summarize a production log: counts, flagged rate and latency percentiles (flat dict of numbers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"service log {path} does not exist (start the service: make serve)")
    records, bad = read_records(path)
    predictions = {r.get("id"): r for r in records if r["type"] == "prediction"}
    feedback = [r for r in records if r["type"] == "feedback"]
    flagged = {r.get("id") for r in feedback if r.get("id") in predictions}
    by_service = {
        r.get("id") for r in feedback if r.get("id") in predictions and r.get("source") == "service"
    }
    latencies = [float(r["latency_ms"]) for r in predictions.values() if _is_number(r.get("latency_ms"))]
    n = len(predictions)
    return {
        "n_predictions": n,
        "n_feedback": len(feedback),
        "n_flagged": len(flagged),
        "n_flagged_by_service": len(by_service),
        "n_flagged_by_user": len(flagged - by_service),
        "flagged_rate": len(flagged) / n if n else 0.0,
        "service_latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "service_latency_ms_p95": float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "n_unknown_feedback": sum(r.get("id") not in predictions for r in feedback),
        "n_bad_lines": bad,
    }


def _is_number(x):
    return isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)


def feedback_record(prediction_id, reason, source):
    return {
        "type": "feedback",
        "id": prediction_id,
        "timestamp": utc_now(),
        "reason": str(reason or ""),
        "source": source,
    }


def flag(log_path, prediction_id, reason, source="cli"):
    """Append a feedback record for a prediction that is in the log; KeyError when it is not."""
    log_path = Path(log_path)
    if not has_prediction(log_path, prediction_id):
        raise KeyError(f"prediction id {prediction_id!r} is not in {log_path}")
    log = ServiceLog(log_path)
    try:
        record = feedback_record(prediction_id, reason, source)
        log.append(record)
    finally:
        log.close()
    return record


def flag_via_service(url, prediction_id, reason):
    import httpx

    try:
        r = httpx.post(f"{url.rstrip('/')}/feedback/{prediction_id}", json={"reason": reason}, timeout=10)
    except httpx.HTTPError as e:
        raise RuntimeError(f"cannot reach the service at {url}: {e}") from e
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {r.text}")
    return r.json()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="feedback", description="Flag wrong predictions; summarize the log."
    )
    parser.add_argument("--log", default=DEFAULT_LOG, help=f"service log (default {DEFAULT_LOG})")
    sub = parser.add_subparsers(dest="command", required=True)
    p_flag = sub.add_parser("flag", help="flag a prediction as wrong")
    p_flag.add_argument("id", help="prediction id returned by POST /predict")
    p_flag.add_argument("--reason", default="", help="what is wrong with it")
    p_flag.add_argument("--url", default=None, help="flag through a running service instead of the file")
    sub.add_parser("summary", help="print the log summary (load_service_log) as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "flag":
            if args.url:
                record = flag_via_service(args.url, args.id, args.reason)
            else:
                record = flag(args.log, args.id, args.reason)
            print(json.dumps(record))
        else:
            print(json.dumps(load_service_log(args.log), indent=2))
    except (KeyError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
