"""`make benchmark`: the loop benchmark's clock and ratios, FLOP counting, the seed table and its files."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY_IMAGES, compose
from {{ cookiecutter.package_name }} import benchmark, loop_benchmark, tracking, training
from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT

TINY = [
    "experiment=smoke",
    "logger=none",
    "training.batch_size=4",
    "training.threads=1",
    "training.progress=false",
    "training.log_every=1",
]


@pytest.fixture
def components(tiny_dataset, tmp_path):
    cfg = compose(*TINY, *tiny_dataset.overrides, f"paths.root={tmp_path}", "training.epochs=1000")
    return training.build(cfg)


def sleeper(seconds_per_batch):
    """A stand-in training loop that takes a known wall time per batch (it spins: a sleep overshoots by
    more when the machine is loaded)."""

    def loop(c, batches, state):
        images = 0
        for batch in batches:
            end = time.perf_counter() + seconds_per_batch
            while time.perf_counter() < end:
                pass
            images += len(batch["image"])
        return images

    return loop


class SlowStart:
    """A loader whose iterator takes `seconds` to start, like worker start-up and prefetch."""

    def __init__(self, loader, seconds):
        self.loader, self.seconds = loader, seconds

    def __iter__(self):
        time.sleep(self.seconds)
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def test_loop_ratio_is_the_ratio_of_the_totals_and_falls_with_a_slower_loop(components):
    loops = {"bare": sleeper(0.01), "ours": sleeper(0.03), "loader": loop_benchmark.loader_only}
    r = loop_benchmark.compare_loops(components, steps=4, warmup_steps=1, rounds=3, log=None, loops=loops)
    assert r["bare_images"] == r["ours_images"] == r["loader_images"] == 3 * 4 * 4
    totals_ratio = (r["ours_images"] / r["ours_seconds"]) / (r["bare_images"] / r["bare_seconds"])
    assert r["loop_ratio"] == pytest.approx(totals_ratio, rel=1e-12)
    assert r["loader_ratio"] == pytest.approx(
        (r["loader_images"] / r["loader_seconds"]) / (r["ours_images"] / r["ours_seconds"]), rel=1e-12
    )
    # each side also pays for fetching its batches: L seconds per batch, measured by the loader side
    fetch = r["loader_seconds"] / (3 * 4)
    assert r["loop_ratio"] == pytest.approx((0.01 + fetch) / (0.03 + fetch), abs=0.06)
    assert len(r["per_round"]) == 3 and set(r["per_round"][0]) == {"bare", "ours", "loader"}


def test_loader_start_up_is_charged_to_every_side(components):
    c = dataclasses.replace(components, train_loader=SlowStart(components.train_loader, 0.3))
    r = loop_benchmark.compare_loops(c, steps=2, warmup_steps=1, rounds=2, log=tracking.Run().log)
    for side in ("bare", "ours", "loader"):
        assert r[f"{side}_seconds"] >= 2 * 0.3, f"{side} was not charged for the loader's start-up"
    assert 0.7 < r["loop_ratio"] < 1.4  # the start-up dominates both sides alike


def test_throughput_runs_our_loop_with_the_configured_logger(tiny_dataset, tmp_path, monkeypatch):
    logged = []

    class Recorder(tracking.Run):
        def log(self, data, step=None):
            logged.append(step)

    monkeypatch.setattr(loop_benchmark.tracking, "start_run", lambda cfg, job_type: Recorder())
    cfg = compose(
        *TINY,
        *tiny_dataset.overrides,
        f"paths.root={tmp_path}",
        "training.benchmark.steps=2",
        "training.benchmark.warmup_steps=1",
        "training.benchmark.rounds=2",
        "training.benchmark.gemm_size=64",
    )
    t = loop_benchmark.throughput(cfg)
    assert logged == [1, 2, 3, 4, 5]  # log_every=1: every step of our loop (1 warm-up + 2 rounds x 2)
    assert t["precision"] == loop_benchmark.precision(cfg, training.pick_device(cfg))
    assert t["flops_per_image"] > 0
    for dtype in ("bfloat16", "float32"):
        peak = t[f"gemm_peak_{dtype}_flop_per_s"]
        assert peak > 0
        assert t[f"fraction_of_{dtype}_peak"] == pytest.approx(t["achieved_flop_per_s"] / peak)
    assert t["achieved_flop_per_s"] == pytest.approx(t["flops_per_image"] * t["ours_images_per_s"])


def test_training_flops_match_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(2, 3, 8, 8)
    flops = loop_benchmark.training_flops(lambda: net(x).sum().backward())
    conv = 2 * 2 * (4 * 8 * 8) * (3 * 3 * 3)  # 2 x batch x outputs x (in channels x kernel)
    linear = 2 * 2 * (4 * 8 * 8) * 5
    # forward: conv + linear; backward: linear's input and weight gradients, conv's weight gradient
    # (the image needs no gradient)
    assert flops == conv + linear + 2 * linear + conv


def run_row(seed, re, te, total_s, float32=False, experiment="default"):
    row = {k: 1.0 for k, _, _ in benchmark.COLUMNS}
    return row | {
        "experiment": experiment,
        "seed": seed,
        "float32_forced": float32,
        "re_deg_median": re,
        "te_cm_median": te,
        "total_s": total_s,
    }


def test_spread_and_checks_take_the_worst_run():
    rows = [run_row(0, 9.0, 0.8, 500), run_row(1, 7.0, 0.9, 560), run_row(2, 8.0, 0.7, 520)]
    spread = benchmark.spread(rows)
    assert spread["re_deg_median"] == {"min": 7.0, "median": 8.0, "max": 9.0}
    assert spread["total_s"] == {"min": 500, "median": 520, "max": 560}
    targets = OmegaConf.create(
        {
            "loop_ratio": 0.95,
            "loader_ratio": 3,
            "pipeline_wall_s": 600,
            "re_deg_median": 10,
            "te_cm_median": 1,
        }
    )
    result = {
        "throughput": {"loop_ratio": 0.97, "loader_ratio": 2.5},
        "pipeline": {
            "runs": [
                *rows,
                run_row(0, 10.5, 0.8, 900, float32=True),
                run_row(0, 20, 2, 500, experiment="baseline"),
            ]
        },
    }
    checks = benchmark.checks(result, targets, "default")
    # the float32 row misses 10 deg; its wall time is not this machine's path; the baseline is not judged
    assert checks == {
        "loop_ratio": True,
        "loader_ratio": False,
        "pipeline_wall_s": True,
        "re_deg_median": False,
        "te_cm_median": True,
    }


def test_seeds_must_be_a_list(tiny_dataset, tmp_path):
    cfg = compose(*TINY, *tiny_dataset.overrides, f"paths.root={tmp_path}", "training.benchmark.seeds=3")
    with pytest.raises(ValueError, match=r"training.benchmark.seeds must be a list.*\[0,1,2\]"):
        benchmark.planned_runs(cfg, "smoke")


@pytest.mark.slow
def test_make_benchmark_prints_the_seed_table(tmp_path):
    overrides = [
        "logger=none",
        f"paths.root={tmp_path}",
        *TINY_IMAGES,
        "data.capture.num_images.train=16",
        "data.capture.num_images.val=8",
        "data.capture.num_images.test=8",
        "training.batch_size=4",
        "training.log_predictions=false",
        "training.benchmark.seeds=[0,1]",
        "training.benchmark.float32=true",
        "training.benchmark.experiments=[]",
        "training.benchmark.steps=2",
        "training.benchmark.rounds=1",
        "training.benchmark.warmup_steps=1",
        "training.benchmark.gemm_size=64",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    out = subprocess.run(
        [
            "make",
            "benchmark",
            f"PYTHON={sys.executable}",
            "EXPERIMENT=smoke",
            f"OVERRIDES={' '.join(overrides)}",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "3_training" / "benchmark.json").read_text())
    report = (tmp_path / "3_training" / "benchmark.md").read_text()
    assert report in out.stdout  # what it prints is what it writes
    runs = result["pipeline"]["runs"]
    assert [(r["experiment"], r["seed"], r["float32_forced"]) for r in runs] == [
        ("smoke", 0, False),
        ("smoke", 1, False),
        ("smoke", 0, True),
    ]
    assert runs[2]["precision"] == "float32"
    assert len({r["capture_s"] for r in runs}) == 1  # one capture shared by every run
    assert result["pipeline"]["seeds"] == [0, 1]
    re = [r["re_deg_median"] for r in runs[:2]]
    assert result["pipeline"]["spread"]["re_deg_median"] == {
        "min": min(re),
        "median": sum(re) / 2,
        "max": max(re),
    }
    assert result["machine"]["cpu_model"] in report
    for line in ("smoke seed 0 |", "smoke seed 1 |", "smoke seed 0 (float32 forced)", "**min** over seeds [0, 1]",
                 "**median** over seeds", "**max** over seeds", "ratio", "GFLOP/s", "of the bfloat16 peak"):  # fmt: skip
        assert line in report, line
