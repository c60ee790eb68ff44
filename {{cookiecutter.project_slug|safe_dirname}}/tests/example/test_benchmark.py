"""`make benchmark`: the loop benchmark's clock and ratios, FLOP counting, the seed table and its files."""

import dataclasses
import json
import os
import subprocess
import sys

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


class VirtualClock:
    """Stands in for the `time` module of loop_benchmark: time passes only when a stand-in says so, so the
    ratios below are exact on any machine under any load (a real clock is what the benchmark measures,
    not what these tests check)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    clock = VirtualClock()
    monkeypatch.setattr(loop_benchmark, "time", clock)
    return clock


def sleeper(clock, seconds_per_batch):
    """A stand-in training loop that takes a known time per batch."""

    def loop(c, batches, state):
        images = 0
        for batch in batches:
            clock.sleep(seconds_per_batch)
            images += len(batch["image"])
        return images

    return loop


class SlowLoader:
    """A loader whose iterator takes `start_up` to start (worker start-up, prefetch) and `per_batch` per batch."""

    def __init__(self, loader, clock, start_up=0.0, per_batch=0.0):
        self.loader, self.clock, self.start_up, self.per_batch = loader, clock, start_up, per_batch

    def __iter__(self):  # the start-up is paid when the iterator is made, as DataLoader's workers start
        self.clock.sleep(self.start_up)
        return self.batches()

    def batches(self):
        for batch in self.loader:
            self.clock.sleep(self.per_batch)
            yield batch

    def __len__(self):
        return len(self.loader)


def test_loop_ratio_is_the_ratio_of_the_totals_and_falls_with_a_slower_loop(components, clock):
    fetch = 0.004  # each side pays for fetching its batches, the loader side for nothing else
    loader = SlowLoader(components.train_loader, clock, per_batch=fetch)
    c = dataclasses.replace(components, train_loader=loader)
    loops = {"bare": sleeper(clock, 0.01), "ours": sleeper(clock, 0.03), "loader": loop_benchmark.loader_only}
    r = loop_benchmark.compare_loops(c, steps=4, warmup_steps=1, rounds=3, log=None, loops=loops)
    assert r["bare_images"] == r["ours_images"] == r["loader_images"] == 3 * 4 * 4
    # the warm-up rounds are not on the clock: 3 rounds of 4 batches each
    assert r["bare_seconds"] == pytest.approx(12 * (0.01 + fetch))
    assert r["ours_seconds"] == pytest.approx(12 * (0.03 + fetch))
    assert r["loader_seconds"] == pytest.approx(12 * fetch)
    assert r["loop_ratio"] == pytest.approx((0.01 + fetch) / (0.03 + fetch))
    assert r["loader_ratio"] == pytest.approx((0.03 + fetch) / fetch)
    assert len(r["per_round"]) == 3 and set(r["per_round"][0]) == {"bare", "ours", "loader"}


def test_loop_ratio_of_the_totals_is_not_a_median_of_per_round_ratios(components, clock):
    """One slow round weighs by its time: the totals' ratio, not the median round's."""
    rounds = iter([0.01, 0.01, 0.01, 0.10, 0.01])  # warm-up, then 4 rounds; the fourth is slow for "ours"

    def ours(c, batches, state):
        per_batch = next(rounds)
        return sleeper(clock, per_batch)(c, batches, state)

    loops = {"bare": sleeper(clock, 0.01), "ours": ours}
    r = loop_benchmark.compare_loops(components, steps=2, warmup_steps=1, rounds=4, log=None, loops=loops)
    assert r["loop_ratio"] == pytest.approx((4 * 2 * 0.01) / (3 * 2 * 0.01 + 2 * 0.10))
    ratios = sorted(m["ours"]["images_per_s"] / m["bare"]["images_per_s"] for m in r["per_round"])
    assert ratios[1] == pytest.approx(1.0)  # the median round: the slow round would vanish in it


def test_loader_start_up_is_charged_to_every_side(components, clock):
    c = dataclasses.replace(components, train_loader=SlowLoader(components.train_loader, clock, start_up=0.3))
    loops = {"bare": sleeper(clock, 0.01), "ours": sleeper(clock, 0.01), "loader": loop_benchmark.loader_only}
    r = loop_benchmark.compare_loops(c, steps=2, warmup_steps=1, rounds=2, log=None, loops=loops)
    # 2 rounds: each side's total is 2 start-ups plus its own work (4 batches of 0.01 s, or nothing)
    assert r["bare_seconds"] == pytest.approx(2 * 0.3 + 4 * 0.01)
    assert r["ours_seconds"] == pytest.approx(2 * 0.3 + 4 * 0.01)
    assert r["loader_seconds"] == pytest.approx(2 * 0.3)
    assert r["loop_ratio"] == pytest.approx(1.0)


def test_compare_loops_runs_the_real_loops(components):
    """The default loops (bare, ours, loader) on the real clock: every side sees the same images."""
    r = loop_benchmark.compare_loops(components, steps=2, warmup_steps=1, rounds=2, log=tracking.Run().log)
    assert r["bare_images"] == r["ours_images"] == r["loader_images"] == 2 * 2 * 4
    assert r["loop_ratio"] > 0 and r["loader_ratio"] > 0


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
