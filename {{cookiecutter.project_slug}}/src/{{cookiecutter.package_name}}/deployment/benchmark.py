import time

import numpy as np


def time_calls(fn, warmup, runs):
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
