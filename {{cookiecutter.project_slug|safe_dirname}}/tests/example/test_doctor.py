"""The doctor and its bug zoo: fault injection, the report's contract, and a reduced zoo end to end."""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import roma
import torch
from omegaconf import OmegaConf

from conftest import capture_dataset, compose
from {{ cookiecutter.package_name }} import training
from {{ cookiecutter.package_name }}.batches import collate
from {{ cookiecutter.package_name }}.debugging import causes, doctor, engine, fixes, leaks, probes, runs, zoo, zoo_benchmark
from {{ cookiecutter.package_name }}.debugging.lab import Lab, TaskAdapter, budget_config
from {{ cookiecutter.package_name }}.paths import CONFIG_DIR
from {{ cookiecutter.package_name }}.pose.task import PoseTask

torch.set_num_threads(1)
ZOO = Path(CONFIG_DIR) / "experiment" / "zoo"


def test_zoo_has_a_config_per_cause_and_healthy_controls():
    names = zoo_benchmark.zoo_names()
    causes = {zoo_benchmark.injected_cause(n) for n in names}
    assert causes == set(doctor.CAUSES) | {"none"}
    assert len([n for n in names if n.startswith("healthy")]) >= 2
    for name in names:
        text = (ZOO / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name
        assert "What you see" in text or "what you see" in text.lower(), (
            f"{name}.yaml must say how a user sees it"
        )
        cfg = compose(f"experiment=zoo/{name}")
        zoo.fault_of(cfg)  # a known fault (or none)
    with pytest.raises(ValueError, match="name must start"):
        zoo_benchmark.injected_cause("mystery")


def test_the_held_out_part_has_its_own_faults_and_healthy_controls_of_two_losses():
    """configs/experiment/zoo_test: >= 8 faults, none the same construction as the development part's (a fault
    or knob setting of its own), and healthy controls of two losses other than the development part's."""
    dev = {n: compose(f"experiment=zoo/{n}") for n in zoo_benchmark.zoo_names()}
    held_out = zoo_benchmark.zoo_names(part="zoo_test")
    assert all(n.startswith("zoo_test/") for n in held_out)
    faulty = [n for n in held_out if zoo_benchmark.injected_cause(n) != "none"]
    assert len(faulty) >= 8

    def construction(cfg):
        return (cfg.debugging.fault, cfg.debugging.get("fault_size"), cfg.training.lr, cfg.training.batch_size,
                cfg.model.width, cfg.model.hidden, cfg.model.dropout, cfg.training.weight_decay, cfg.loss.name)  # fmt: skip

    dev_constructions = {construction(cfg) for cfg in dev.values()}
    losses = set()
    for name in held_out:
        text = (ZOO.parent / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n") and "what you see" in text.lower(), name
        cfg = compose(f"experiment={name}")
        zoo.fault_of(cfg)
        assert construction(cfg) not in dev_constructions, f"{name} repeats a development config"
        if zoo_benchmark.injected_cause(name) == "none":
            losses.add(cfg.loss.name)
    assert len(losses) >= 2 and not losses & {cfg.loss.name for cfg in dev.values()}
    with pytest.raises(ValueError, match="no part of the zoo"):
        zoo_benchmark.injected_cause("zoo_private/lr_too_high")


def test_zoo_benchmark_scores_the_doctor_it_runs(tmp_path, monkeypatch, capsys):
    """run -> summarize -> markdown, through `make doctor-benchmark`'s main, with a scripted doctor: right on
    lr_too_high, wrong on not_started, crashing on implementation_bug, a false alarm on healthy seed 1; in the
    held-out part, right on one fault and a false alarm on one healthy seed, in a table of its own."""
    answers = {"lr_too_high": "lr_too_high", "not_started": "lr_too_low", "healthy/seed0": "none",
               "healthy/seed1": "poor_init", "zoo_test/lr_too_high_0p3": "lr_too_high",
               "zoo_test/healthy_quaternion/seed0": "architecture", "zoo_test/healthy_quaternion/seed1": "none"}  # fmt: skip
    seen, amp = [], set()

    def scripted_doctor(cfg, name):
        seen.append((name, cfg.seed, cfg.debugging.fault, cfg.debugging.doctor.verbose))
        amp.add(cfg.training.amp)
        label = name.removeprefix("zoo/")
        if label == "implementation_bug":
            raise RuntimeError("probe crashed")
        return {"top_cause": answers[label]}

    monkeypatch.setattr(doctor, "run_doctor", scripted_doctor)
    configs = "benchmark.configs=[lr_too_high,not_started,zoo/implementation_bug,healthy,zoo_test/lr_too_high_0p3,zoo_test/healthy_quaternion]"
    zoo_benchmark.main([f"paths.root={tmp_path}", "logger=none", "training.amp=false", configs,
                        "benchmark.seeds=2", "benchmark.faulty_seeds=1"])  # fmt: skip
    faults = {name: compose(f"experiment=zoo/{name}").debugging.fault for name in ("lr_too_high", "healthy")}
    assert [(n, s) for n, s, _, _ in seen] == [
        ("zoo/lr_too_high", 0), ("zoo/not_started", 0), ("zoo/implementation_bug", 0),
        ("zoo/healthy/seed0", 0), ("zoo/healthy/seed1", 1), ("zoo_test/lr_too_high_0p3", 0),
        ("zoo_test/healthy_quaternion/seed0", 0), ("zoo_test/healthy_quaternion/seed1", 1),
    ]  # fmt: skip
    assert seen[5][2] is None and compose("experiment=zoo_test/lr_too_high_0p3").training.lr == 0.3
    assert seen[0][2] == faults["lr_too_high"] and seen[3][2] == faults["healthy"] and not seen[0][3]

    out = tmp_path / "4_debugging" / "doctor"
    written = json.loads((out / "benchmark.json").read_text())
    parts, cond = written["parts"], written["conditions"]
    # the conditions say what the doctors ran with: float32 forced here reached every doctor
    assert amp == {False} and cond["precision"] == "float32"
    assert cond["overrides"] == [f"paths.root={tmp_path}", "logger=none", "training.amp=false"]
    assert cond["jobs"] == 1 and cond["first_seed"] == 0
    assert cond["cpu_model"] and cond["started"] <= cond["finished"]
    assert list(parts) == ["zoo", "zoo_test"]
    summary, held_out = parts["zoo"], parts["zoo_test"]
    assert (held_out["correct"], held_out["faulty_configs"], held_out["false_alarms"], held_out["healthy_runs"]) == (
        1, 1, 1, 2,
    )  # fmt: skip
    assert (
        held_out["rows"][0]["config"] == "zoo_test/lr_too_high_0p3"
        and held_out["rows"][0]["part"] == "zoo_test"
    )
    assert (summary["correct"], summary["faulty_configs"], summary["false_alarms"], summary["healthy_runs"]) == (
        1, 3, 1, 2,
    )  # fmt: skip
    assert summary["top1_accuracy"] == pytest.approx(1 / 3)
    rows = {(r["config"], r["seed"]): r for r in summary["rows"]}
    assert rows[("implementation_bug", 0)]["diagnosed"] == "error"
    assert rows[("implementation_bug", 0)]["error"] == "RuntimeError: probe crashed"
    assert summary["confusion"]["not_started"]["lr_too_low"] == 1
    assert summary["confusion"]["none"] == {
        label: int(label in ("none", "poor_init")) for label in summary["confusion"]["none"]
    }
    report = (out / "benchmark.md").read_text()
    assert report == zoo_benchmark.report(parts, cond) and report in capsys.readouterr().out
    assert (
        f"in float32, torch {torch.__version__}" in report
        and "`" + " ".join(cond["overrides"]) + "`" in report
    )
    development, test = report.split("## Test (held out) part: configs/experiment/zoo_test")
    assert "## Development part: configs/experiment/zoo" in development
    assert "Top-1 accuracy on faulty runs: **1/3 = 33%**" in development
    assert "False alarms on healthy runs: **1/2**" in development
    assert "| not_started | 0 | `not_started` | `lr_too_low` | **no** |" in development
    assert (
        "| `none` |" in development
        and "| lr_too_high | 0 | `lr_too_high` | `lr_too_high` | yes |" in development
    )
    assert (
        "Top-1 accuracy on faulty runs: **1/1 = 100%**" in test
        and "zoo_test/lr_too_high_0p3" not in development
    )
    assert "| zoo_test/healthy_quaternion | 0 | `none` | `architecture` | **no** |" in test
    # healthy configs only: no accuracy to report, and markdown says so instead of failing
    healthy_only = zoo_benchmark.summarize([r for r in summary["rows"] if r["injected"] == "none"])
    assert healthy_only["top1_accuracy"] is None
    assert "Top-1 accuracy on faulty runs: **0/0**" in zoo_benchmark.markdown(healthy_only)


def test_zoo_benchmark_runs_faulty_configs_over_two_seeds_by_default():
    names = ["lr_too_high", "healthy"]
    assert zoo_benchmark.plan(names, seeds=3, faulty_seeds=2) == [
        ("lr_too_high", 0, "lr_too_high/seed0"), ("lr_too_high", 1, "lr_too_high/seed1"),
        ("healthy", 0, "healthy/seed0"), ("healthy", 1, "healthy/seed1"), ("healthy", 2, "healthy/seed2"),
    ]  # fmt: skip
    # other seeds (benchmark.first_seed): every report folder names its seed, so none overwrites seed 0's
    assert zoo_benchmark.plan(names, seeds=2, faulty_seeds=1, first_seed=2) == [
        ("lr_too_high", 2, "lr_too_high/seed2"), ("healthy", 2, "healthy/seed2"), ("healthy", 3, "healthy/seed3"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"benchmark.first_seed must be >= 0"):
        zoo_benchmark.run(OmegaConf.create({"benchmark": {"configs": names, "first_seed": -1}}), [])
    cfg = compose()
    with pytest.raises(ValueError, match=r"benchmark.jobs must be >= 1"):
        zoo_benchmark.run(OmegaConf.create({"benchmark": {"configs": names, "jobs": 0}}), [])
    with pytest.raises(ValueError, match="name must start"):
        zoo_benchmark.run(OmegaConf.create({"benchmark": {"configs": ["mystery"]}}), [])
    with pytest.raises(ValueError, match="'zoo_private' is not a part of the zoo"):
        zoo_benchmark.run(OmegaConf.create({"benchmark": {"parts": ["zoo_private"]}}), [])
    assert cfg.debugging.doctor.threads == 1  # two doctors side by side use one core each


def test_zoo_benchmark_with_two_jobs_keeps_the_table_in_order(tmp_path):
    """benchmark.jobs=2: two spawned doctor processes; here each doctor fails fast on a missing dataset, so
    the rows come back as errors, in the planned order, with the planned seeds (no doctor is mocked)."""
    missing = tmp_path / "no-dataset"
    overrides = [f"paths.root={tmp_path}", "logger=none", f"data.root={missing}"]
    bench = {"configs": ["lr_too_high", "not_started", "healthy"], "seeds": 2, "faulty_seeds": 1, "jobs": 2}
    rows = zoo_benchmark.run(OmegaConf.create({"benchmark": bench}), overrides)
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("lr_too_high", 0), ("not_started", 0), ("healthy", 0), ("healthy", 1),
    ]  # fmt: skip
    assert all(r["diagnosed"] == "error" and str(missing) in r["error"] for r in rows), rows
    assert not (tmp_path / "4_debugging" / "doctor" / "zoo").exists() or not any(
        (tmp_path / "4_debugging" / "doctor" / "zoo").rglob("report.json")
    )  # a failed doctor leaves no half-written report


def running(pid):
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_zoo_benchmark_workers_leave_when_the_benchmark_is_killed(tmp_path):
    """A killed `make doctor-benchmark` must not leave its doctors running (minutes of CPU each)."""
    script = tmp_path / "bench.py"
    script.write_text(
        "import os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import multiprocessing\n"
        "from {{ cookiecutter.package_name }}.debugging import zoo_benchmark\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, multiprocessing.get_context('spawn'),\n"
        "        initializer=zoo_benchmark._exit_with_parent, initargs=(os.getpid(),))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(CONFIG_DIR).parent / "src"))
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(bench.stdout.readline())
    bench.kill()  # SIGKILL: no cleanup runs in the benchmark process
    bench.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and running(worker):
        time.sleep(0.2)
    assert not running(worker)


class PoseLike(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 8, 8, generator=g)
        self.t = torch.rand(n, 3, generator=g) * 100 + torch.tensor([0.0, 0.0, 200.0])
        self.R = torch.linalg.qr(torch.randn(n, 3, 3, generator=g))[0]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "t": self.t[i], "R": self.R[i]}


def fault_cfg(fault, size=12):
    return compose(f"debugging.fault={fault}", f"debugging.fault_size={size}")


def test_data_faults_do_what_they_say():
    train, val = PoseLike(64, 0), PoseLike(40, 1)
    tr, va = zoo.fault_datasets(fault_cfg("shuffled_targets"), train, val)
    moved = sum(not torch.equal(tr[i]["t"], train[i]["t"]) for i in range(64))
    assert moved > 50 and torch.equal(tr[0]["image"], train[0]["image"])
    assert sorted(float(tr[i]["t"][2]) for i in range(64)) == sorted(float(t[2]) for t in train.t)

    leak = zoo.pixel_fault(fault_cfg("answer_in_input"))
    leaked = [runs.unbatch(leak(collate([d[i] for i in range(len(d))]))) for d in (train, val)]
    task = runs.Task(None, None, *leaked, target_fn=PoseTask(None).target)
    assert leaks.shortcut_probe(task)["best_single_value_r2"] > 0.99

    tr, _ = zoo.fault_datasets(fault_cfg("sorted_by_target"), train, val)
    depth = [float(tr[i]["t"][2]) for i in range(64)]
    assert depth == sorted(depth)
    loader = torch.utils.data.DataLoader(tr, batch_size=16, shuffle=False)
    order = probes.order_test(runs.Task(None, None, [], [], target_fn=PoseTask(None).target), loader)
    assert order["p_value"] < 1e-3

    _, va = zoo.fault_datasets(fault_cfg("tiny_val", size=5), train, val)
    assert len(va) == 5
    _, va = zoo.fault_datasets(fault_cfg("val_in_train"), train, val)
    dup = leaks.duplicates({"train": [train[i] for i in range(64)], "val": [va[i] for i in range(len(va))]})
    assert dup["train/val"]["shared"] == 40
    offset = zoo.pixel_fault(fault_cfg("black_level"))
    assert float(offset(collate([train[0]]))["image"].min()) >= 1000.0
    assert zoo.pixel_fault(fault_cfg("tiny_val")) is None


def brightness_keyed(n=1024, share=0.5, seed=0):
    """Noise images whose gain follows the distance t_z for `share` of its variance and a nuisance (another
    session's exposure) for the rest: a leak a trivial model finds only in part."""
    g = torch.Generator().manual_seed(seed)
    data = PoseLike(n, seed)
    items = [data[i] for i in range(n)]
    tz = torch.stack([it["t"][2] for it in items])
    u, v = (tz - tz.mean()) / tz.std(), torch.randn(n, generator=g)
    gain = 1 + 0.2 * (share**0.5 * u + (1 - share) ** 0.5 * v)
    return [it | {"image": it["image"] * gain[i]} for i, it in enumerate(items)]


def test_a_weaker_brightness_leak_is_confirmed_by_standardizing_each_image():
    """A leak below `shortcut_r2` on global statistics is found once standardizing every image removes it;
    the clean images give nothing to find, and neither does a layout correlation the standardization keeps."""
    th = compose().debugging.doctor.thresholds
    leaked = leaks.shortcut_probe(
        runs.Task(None, None, brightness_keyed(), [], target_fn=PoseTask(None).target)
    )
    assert th.shortcut_candidate_r2 <= leaked["trivial_model_r2"] < th.shortcut_r2
    assert leaked["trivial_model_r2_per_image_standardized"] < 0.1
    assert leaks.shortcut_found(leaked, th) == "image statistics"

    data = PoseLike(1024, 0)
    clean = [data[i] for i in range(1024)]
    found = leaks.shortcut_probe(runs.Task(None, None, clean, [], target_fn=PoseTask(None).target))
    assert found["trivial_model_r2"] < 0.1 and leaks.shortcut_found(found, th) is None
    for it in clean:  # a bright blob whose column is the distance: content, not a global statistic
        it["image"][:, 3:5, int((it["t"][2] - 200) / 100 * 7)] += 0.4
    drawn = leaks.shortcut_probe(runs.Task(None, None, clean, [], target_fn=PoseTask(None).target))
    assert drawn["trivial_model_r2"] >= th.shortcut_candidate_r2
    assert leaks.shortcut_found(drawn, th) is None
    assert (
        drawn["trivial_model_r2_per_image_standardized"]
        > th.shortcut_confirm_share * drawn["trivial_model_r2"]
    )


def test_held_out_faults_do_what_they_say():
    train, val = PoseLike(64, 0), PoseLike(40, 1)
    tr, va = zoo.fault_datasets(fault_cfg("shifted_targets"), train, val)
    assert all(torch.equal(tr[i]["t"], train[(i + 1) % 64]["t"]) for i in range(64))
    assert torch.equal(va[39]["R"], val[0]["R"]) and torch.equal(tr[5]["image"], train[5]["image"])

    tr, _ = zoo.fault_datasets(fault_cfg("sorted_by_tilt"), train, val)
    tilt = [float(tr[i]["R"][2, 2]) for i in range(64)]
    assert tilt == sorted(tilt) and len(tr) == 64
    loader = torch.utils.data.DataLoader(tr, batch_size=16, shuffle=False)
    order = probes.order_test(runs.Task(None, None, [], [], target_fn=PoseTask(None).target), loader)
    assert order["p_value"] < 1e-3

    overlay = zoo.pixel_fault(fault_cfg("distance_overlay"))
    batch = collate([train[i] for i in range(64)])
    bars = overlay(batch | {"image": torch.zeros_like(batch["image"])})["image"]
    assert float(bars[:, :, :-2].abs().sum()) == 0.0  # only the two bottom rows are drawn on
    lengths = bars[:, 0, -1].sum(1)
    assert torch.equal(lengths, (batch["t"][:, 2] / 400 * 8).round().clamp(0, 8))

    exposure = zoo.pixel_fault(fault_cfg("exposure_by_distance"))(batch)["image"]
    torch.testing.assert_close(exposure, batch["image"] * (batch["t"][:, 2] / 240)[:, None, None, None])

    tinted = zoo.pixel_fault(fault_cfg("tint_by_tilt"))(batch)["image"]
    c = batch["R"][:, 2, 2][:, None, None]
    torch.testing.assert_close(tinted[:, 0], batch["image"][:, 0] * (1 + 0.2 * c))
    torch.testing.assert_close(tinted[:, 1], batch["image"][:, 1])
    torch.testing.assert_close(tinted[:, 2], batch["image"][:, 2] * (1 - 0.2 * c))

    stamped = zoo.pixel_fault(fault_cfg("tilt_stamp"))(batch)["image"]
    changed = (stamped != batch["image"]).any(0).any(0)  # [H, W]: where any image was drawn on
    assert changed.nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (-4 % 8, -3 % 8, -2 % 8)]
    level = stamped[:, 0, 1:4, -4:-1].mean((1, 2))  # the stamp's mean level carries the tilt, under noise
    tilt = (batch["R"][:, 2, 2] + 1) / 2
    assert torch.corrcoef(torch.stack([level, tilt]))[0, 1] > 0.9
    assert float((stamped[:, 0, 1:4, -4:-1] - tilt[:, None, None]).std()) > 0.2  # no pixel carries it cleanly

    tr, va = zoo.fault_datasets(fault_cfg("foreign_labels"), train, val)
    assert len(tr) == 64 and len(va) == 40 and torch.equal(tr[3]["image"], train[3]["image"])
    rotations = torch.stack([tr[i]["R"] for i in range(64)])
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(64, 3, 3))
    assert all(not torch.equal(tr[i]["R"], train[i]["R"]) for i in range(64))
    assert {tuple(tr[i]["t"].tolist()) for i in range(64)} <= {tuple(t.tolist()) for t in train.t}
    assert sum(torch.equal(tr[i]["t"], train[i]["t"]) for i in range(64)) < 8  # another frame's, mostly
    assert torch.equal(tr[5]["R"], zoo.fault_datasets(fault_cfg("foreign_labels"), train, val)[0][5]["R"])

    raw = zoo.pixel_fault(fault_cfg("raw_pixels"))
    torch.testing.assert_close(raw(batch)["image"], batch["image"] * 255)
    double = zoo.pixel_fault(fault_cfg("double_scaled"))(batch)["image"]
    torch.testing.assert_close(double, batch["image"] / 255)
    assert float(double.min()) >= 0 and float(double.max()) <= 1 / 255

    calls = []
    criterion = zoo.fault_loss(fault_cfg("broadcast_target"), lambda out, b: calls.append(b["t"]) or 0.0)
    criterion(None, batch)
    assert torch.equal(calls[0], batch["t"][:1].expand(64, 3)) and torch.equal(batch["t"], train.t[:64])
    seen = []
    criterion = zoo.fault_loss(fault_cfg("rolled_target"), lambda out, b: seen.append(b) or 0.0)
    criterion(None, batch)
    assert torch.equal(seen[0]["R"][1:], batch["R"][:-1]) and torch.equal(seen[0]["R"][0], batch["R"][-1])
    assert torch.equal(seen[0]["t"], batch["t"])
    plain = object()
    assert zoo.fault_loss(fault_cfg("shifted_targets"), plain) is plain

    tr, va = zoo.fault_datasets(fault_cfg("mirrored_images"), train, val)
    assert va is val and len(tr) == 64
    for i in range(64):
        image = train[i]["image"].flip(-1) if i % 2 else train[i]["image"]
        assert torch.equal(tr[i]["image"], image) and torch.equal(tr[i]["R"], train[i]["R"])
        assert torch.equal(tr[i]["t"], train[i]["t"])
    assert not torch.equal(tr[1]["image"], train[1]["image"])

    def from_xyzw(x, y, z, w):  # the unit quaternion's rotation matrix, written out (not roma's)
        return torch.tensor([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])  # fmt: skip

    tr, va = zoo.fault_datasets(fault_cfg("quaternion_order"), train, val)
    assert va is val and len(tr) == 64
    for i in range(64):
        assert torch.equal(tr[i]["image"], train[i]["image"]) and torch.equal(tr[i]["t"], train[i]["t"])
        if i < 32:
            assert torch.equal(tr[i]["R"], train[i]["R"])
            continue
        x, y, z, w = roma.rotmat_to_unitquat(train[i]["R"]).tolist()
        torch.testing.assert_close(from_xyzw(x, y, z, w), train[i]["R"], atol=1e-5, rtol=0)  # the formula
        torch.testing.assert_close(tr[i]["R"], from_xyzw(w, x, y, z), atol=1e-5, rtol=0)  # w,x,y,z as x,y,z,w
        assert float((tr[i]["R"] - train[i]["R"]).abs().amax()) > 0.1

    tr, va = zoo.fault_datasets(fault_cfg("centimetre_recording"), train, val)
    assert va is val and len(tr) == 64
    for i in range(64):
        assert torch.equal(tr[i]["image"], train[i]["image"]) and torch.equal(tr[i]["R"], train[i]["R"])
        t = train[i]["t"] / 10 if i >= 64 - 21 else train[i]["t"]  # the last third (21 of 64) in cm
        assert torch.equal(tr[i]["t"], t), i

    tr, va = zoo.fault_datasets(fault_cfg("dropped_frame"), train, val)
    assert va is val and len(tr) == 63  # frame 25 (40 % of 64) dropped from the images, not from the labels
    for i in range(63):
        image = train[i if i < 25 else i + 1]["image"]
        assert torch.equal(tr[i]["image"], image) and torch.equal(tr[i]["t"], train[i]["t"]), i
        assert torch.equal(tr[i]["R"], train[i]["R"]), i
    # the image after the drop carries the dropped frame's pose, not its own
    assert not torch.equal(tr[25]["t"], train[26]["t"])

    clean = two_head_net()(batch["image"])
    rounded = zoo.fault_model(fault_cfg("rounded_output"), two_head_net())(batch["image"])
    torch.testing.assert_close(rounded["rot"], clean["rot"])
    torch.testing.assert_close(rounded["trans"], clean["trans"], atol=0.005, rtol=0)
    assert not torch.equal(rounded["trans"], clean["trans"])


def test_augmentation_faults_turn_the_labels_the_wrong_way():
    """The in-plane rotation with a wrong label update: `labels_turned_back` turns the pose by Q^T where the
    image turned by Q, `turned_in_object_frame` sets the orientation to R Q instead of Q R (translation right);
    both leave the images as the correct augmentation turns them, and neither touches a run without it."""
    from {{ cookiecutter.package_name }}.pose.task import rotate_in_plane

    batch = collate([PoseLike(64, 0)[i] for i in range(64)])
    K = torch.tensor([[8.0, 0.0, 4.0], [0.0, 8.0, 4.0], [0.0, 0.0, 1.0]]).expand(64, 3, 3)
    batch = batch | {"K": K}
    augment = functools.partial(rotate_in_plane, max_deg=180)
    assert zoo.fault_augment(fault_cfg("mirrored_images"), augment) is augment
    torch.manual_seed(3)
    right = augment(batch)
    Q = right["R"] @ batch["R"].transpose(1, 2)  # the turn the image got
    torch.testing.assert_close(Q @ Q.transpose(1, 2), torch.eye(3).expand(64, 3, 3))  # a rotation
    for fault, R, t in (
        ("labels_turned_back", Q.transpose(1, 2) @ batch["R"], Q.transpose(1, 2) @ batch["t"].unsqueeze(-1)),
        ("turned_in_object_frame", batch["R"] @ Q, Q @ batch["t"].unsqueeze(-1)),
        ("translation_left_unturned", Q @ batch["R"], batch["t"].unsqueeze(-1)),
    ):
        assert zoo.fault_augment(fault_cfg(fault), None) is None
        torch.manual_seed(3)
        wrong = zoo.fault_augment(fault_cfg(fault), augment)(batch)
        assert torch.equal(wrong["image"], right["image"]) and not torch.equal(right["image"], batch["image"])
        torch.testing.assert_close(wrong["R"], R)
        torch.testing.assert_close(wrong["t"], t.squeeze(-1), rtol=1e-4, atol=1e-3)  # mm
        assert float((wrong["R"] - right["R"]).abs().amax() + (wrong["t"] - right["t"]).abs().amax()) > 0.5, (
            fault
        )


# the screen's checks with nothing wrong in them: `causes.integrity` finds nothing on these alone
CLEAN_CHECKS = {
    "batch_dependency_eval": {"ratio": 0.0, "own_gradient": 1.0},
    "init": {"without_gradient": [], "n_trainable": 4},
    "shortcut": {"best_single_value_r2": 0.0, "trivial_model_r2": 0.0},
    "duplicates": {},
    "test_set": {"n_test": 1000, "relative_half_width": 0.01},
}


def integrity_lab(**thresholds):
    """The lab `causes.integrity` reads: the thresholds it needs (the defaults' values), and `fault_fix`."""
    th = SimpleNamespace(batch_dependency_ratio=1e-6, shortcut_r2=0.6, shortcut_candidate_r2=0.4,
                         shortcut_confirm_share=0.5, duplicate_fraction=0.01, min_test_size=385, **thresholds)  # fmt: skip
    return SimpleNamespace(
        th=th, adapter=SimpleNamespace(fault_fix=lambda text="fix the data/model code": text)
    )


def test_augmentation_label_check_names_a_wrong_label_update_of_the_pose_augmentation():
    """PoseTask.draw_labels through the in-plane rotation: the right label update agrees with the turned drawing
    on every sample, also for objects larger than the frame; the development faults (`labels_turned_back`,
    `turned_in_object_frame`) and a construction of this test's own (the labels turned, the image returned as
    it was) disagree on most, and `causes.integrity` names `implementation_bug` for them only."""
    from {{ cookiecutter.package_name }}.pose.task import rotate_in_plane

    g = torch.Generator().manual_seed(0)
    task = PoseTask(compose())
    task.points_mm = torch.randn(200, 3, generator=g) * torch.tensor([40.0, 20.0, 10.0]) + torch.tensor(
        [5.0, 0, 0]
    )
    n = 64
    K = torch.tensor([[40.0, 0.0, 15.5], [0.0, 40.0, 15.5], [0.0, 0.0, 1.0]]).expand(n, 3, 3)
    t = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 120, 300 + 100 * torch.rand(n, 1, generator=g)], 1)
    batch = {
        "image": torch.rand(n, 3, 32, 32, generator=g),
        "K": K,
        "R": roma.random_rotmat(n, generator=g),
        "t": t,
    }
    augment = functools.partial(rotate_in_plane, max_deg=180)
    lab = integrity_lab(augmentation_label_correlation=0.9, augmentation_disagreeing_share=0.1)

    def check(augmentation, batch=batch):
        agreement = probes.augmentation_agreement(task.draw_labels, augmentation, batch)
        return agreement, causes.integrity(
            lab, SimpleNamespace(checks=CLEAN_CHECKS | {"augmentation_labels": agreement})
        )

    right, found = check(augment)
    assert right["correlation_min"] > 0.95 and found == {}
    # the same poses ten times nearer: objects larger than the frame, cut by it, and turned into view
    near, found = check(augment, batch | {"t": batch["t"] / 10})
    assert near["inside_share_median"] < 0.9 and near["correlation_min"] > 0.95 and found == {}
    image_kept = lambda b: augment(b) | {"image": b["image"]}  # noqa: E731
    for name, wrong in [(f, zoo.fault_augment(fault_cfg(f), augment)) for f in ("labels_turned_back", "turned_in_object_frame")] + [("image_kept", image_kept)]:  # fmt: skip
        agreement, found = check(wrong)
        bug = found["implementation_bug"]
        assert bug["strength"] > 0.5 and "augmentation" in bug["summary"], name


def two_head_net():
    """A linear network on PoseLike's 8x8 images with a pose-like dict output: "rot" (4 values), "trans" (2)."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 6))

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            out = self.body(x)
            return {"rot": out[:, :4], "trans": out[:, 4:]}

    return Heads()


def test_a_fix_counts_only_when_the_next_seed_repeats_it():
    """engine.run trains a fix that helped once more on the next seed, and the finding is present only when
    that seed's run helps too; a fix that did not help is not repeated, nor is a row measured directly
    (ALWAYS, the data order)."""

    class Lab:
        def __init__(self, helps):
            self.helps, self.trained = helps, []

        def train(self, name, task):
            self.trained.append((name, task.seed))
            return SimpleNamespace(seed=task.seed)

        def fix_effect(self, ref, run):
            gain = 0.1 if self.helps[run.seed] else 0.01
            return {"helped": self.helps[run.seed], "p_value": 1e-3, "gain": gain, "val_loss_after": 1.0,
                    "metric": "loss", "unstuck": []}  # fmt: skip

    def row(tried_on):
        task = runs.Task(None, None, [], [], seed=3)
        return engine.Fix(
            "lr_too_high", "loss_bounces", tried_on, applies=lambda ctx: True,
            variant=lambda ctx: engine.Variant("fixed", task), fix=lambda ctx, v: "training.lr=0.001",
            explain=lambda ctx, v, effect: (fixes._effect(effect), {"effect": effect}),
        )  # fmt: skip

    for helps, present in (
        ({3: True, 4: True}, True),
        ({3: True, 4: False}, False),
        ({3: False, 4: True}, False),
    ):
        lab = Lab(helps)
        found = engine.run(SimpleNamespace(lab=lab, ref=None), [row(engine.BAD)])["lr_too_high"]
        assert found["present"] is present, helps
        assert lab.trained == ([("fixed", 3), ("fixed_seed+1", 4)] if helps[3] else [("fixed", 3)])
        assert ("not repeated, seed-to-seed luck" in found["summary"]) is (helps[3] and not helps[4])
    lab = Lab({3: True, 4: False})
    assert engine.run(SimpleNamespace(lab=lab, ref=None), [row(engine.ALWAYS)])["lr_too_high"]["present"]
    assert lab.trained == [("fixed", 3)]


def test_clamped_outputs_are_the_clean_outputs_cut_at_zero():
    batch = collate([PoseLike(64)[i] for i in range(64)])
    clean = two_head_net()(batch["image"])
    clamped = zoo.fault_model(fault_cfg("clamped_output"), two_head_net())(batch["image"])
    assert (clean["rot"] < 0).any() and (clean["trans"] < 0).any()
    for key in ("rot", "trans"):
        torch.testing.assert_close(clamped[key], clean[key].clamp(min=0))


def test_outputs_no_parameter_can_move_are_found_and_blamed_on_the_code():
    """The dead-output check: output components whose gradient w.r.t. every parameter is exactly zero on a
    batch (a ReLU on the output whose input went negative on every sample, as training leaves the clamped
    fault; a rounded output) are listed, a clean network has none, and the integrity check names
    implementation_bug with the dead components."""
    batch = collate([PoseLike(8)[i] for i in range(8)])
    assert probes.dead_outputs(two_head_net(), batch) == {"n_components": 6, "n_samples": 8, "dead": []}

    clamped = zoo.fault_model(fault_cfg("clamped_output"), two_head_net())
    with torch.no_grad():
        clamped.body[1].bias[4:] = -100.0  # the two trans outputs below zero on every sample
    assert probes.dead_outputs(clamped, batch)["dead"] == ["trans[0]", "trans[1]"]
    with torch.no_grad():
        clamped.body[1].bias[4] = 100.0  # alive on every sample again
    assert probes.dead_outputs(clamped, batch)["dead"] == ["trans[1]"]
    rounded = zoo.fault_model(fault_cfg("rounded_output"), two_head_net())
    assert probes.dead_outputs(rounded, batch)["dead"] == ["trans[0]", "trans[1]"]
    detached = zoo.fault_model(fault_cfg("detached_output"), two_head_net())
    assert probes.dead_outputs(detached, batch)["dead"] == ["trans[0]", "trans[1]"]
    diverged = two_head_net()
    with torch.no_grad():
        diverged.body[1].weight.fill_(float("nan"))
    assert probes.dead_outputs(diverged, batch)["dead"] == []  # NaN is not "no gradient"

    lab = integrity_lab()
    scr = SimpleNamespace(checks=CLEAN_CHECKS | {"dead_outputs": probes.dead_outputs(two_head_net(), batch)})
    assert causes.integrity(lab, scr) == {}
    scr.checks["dead_outputs"] = probes.dead_outputs(rounded, batch)
    bug = causes.integrity(lab, scr)["implementation_bug"]
    assert bug["present"] and bug["strength"] == pytest.approx(2 / 6)
    assert "2 of 6 output components (trans[0], trans[1])" in bug["summary"]
    assert bug["evidence"]["dead_outputs"]["dead"] == ["trans[0]", "trans[1]"]


def conv_bn_net(outputs=6):
    """conv -> batch norm -> linear on PoseLike's 8x8 images: a conv layer to freeze, layers that still train."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, outputs)
    )


def test_frozen_convs_leave_the_convolutions_without_gradient():
    batch = collate([PoseLike(8)[i] for i in range(8)])
    net = conv_bn_net

    frozen = zoo.fault_model(fault_cfg("frozen_convs"), net())
    frozen(batch["image"]).sum().backward()
    assert frozen[0].weight.grad is None and frozen[0].bias.grad is None
    assert frozen[1].weight.grad is not None and frozen[3].weight.grad is not None
    clean = net()
    clean(batch["image"]).sum().backward()
    assert clean[0].weight.grad is not None


def test_frozen_parameters_are_listed_and_the_fix_row_trains_them():
    """The init check lists parameters with requires_grad=False (`frozen`, which `without_gradient` cannot
    see: nothing asks for their gradient); the fix table's row applies exactly then, and its variant is the
    same model with every parameter trainable."""
    batch = collate([PoseLike(8)[i] for i in range(8)])

    def net():
        torch.manual_seed(0)
        return conv_bn_net(outputs=3)

    def mse(out, b):
        return torch.nn.functional.mse_loss(out, b["t"] / 100)

    frozen = probes.init_statistics(zoo.fault_model(fault_cfg("frozen_convs"), net()), batch, mse)
    assert frozen["frozen"] == ["0.weight", "0.bias"] and frozen["without_gradient"] == []
    assert probes.init_statistics(net(), batch, mse)["frozen"] == []

    row = next(r for r in fixes.TABLE if r.variant is fixes._unfrozen_variant)
    assert row.cause == "implementation_bug" and set(row.tried_on) == set(engine.BAD)

    class Ctx:
        def __init__(self, init, model_factory):
            self.screen = type("S", (), {"checks": {"init": init}})()
            self.task = runs.Task(model_factory, mse, [], [])

    faulty = Ctx(frozen, lambda: zoo.fault_model(fault_cfg("frozen_convs"), net()))
    assert row.applies(faulty) and not row.applies(Ctx(probes.init_statistics(net(), batch, mse), net))
    variant = row.variant(faulty)
    model = variant.task.model_factory()
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in faulty.task.model_factory()[0].parameters())
    effect = {"gain": 0.3, "p_value": 1e-4, "metric": "loss"}
    summary, evidence = fixes._unfrozen_explain(faulty, variant, effect)
    assert "2 parameter tensors are frozen" in summary and "0.weight" in summary
    assert evidence["frozen"] == ["0.weight", "0.bias"]


def test_pixel_faults_act_after_the_augmentation(tiny_dataset):
    """The loaders apply a leak or a sensor offset to the images the network gets, after the in-plane
    rotation: the leaked pixels stay where they were written, and no zero padding undercuts the offset."""
    for fault in ("black_level", "answer_in_input"):
        cfg = compose(
            *tiny_dataset.overrides,
            "training.augment.rotate_deg=180",
            f"debugging.fault={fault}",
            "logger=none",
        )
        batch = next(iter(training.build(cfg).train_loader))
        if fault == "black_level":
            assert float(batch["image"].min()) >= 1000.0
        else:
            expected = zoo.answer_in_input(batch | {"image": torch.zeros_like(batch["image"])})["image"]
            torch.testing.assert_close(batch["image"][:, 0, 0, :6], expected[:, 0, 0, :6])


def test_model_faults_are_caught_by_the_backprop_checks():
    batch = collate([PoseLike(8)[i] for i in range(8)])

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(6))

    clean = net()
    clean(batch["image"])
    assert probes.batch_dependency(clean, batch)["ratio"] == 0.0
    mixing = zoo.fault_model(fault_cfg("batch_mixing"), net())
    assert probes.batch_dependency(mixing, batch)["ratio"] > 1e-3
    blind = zoo.fault_model(fault_cfg("ignores_input"), net())
    assert probes.batch_dependency(blind, batch)["own_gradient"] == 0.0


def run_doctor(tiny_dataset, tmp_path, *overrides):
    cfg = compose(
        *tiny_dataset.overrides,
        f"paths.root={tmp_path}",
        "logger=none",
        "debugging.doctor.verbose=false",
        "debugging.doctor.epochs=2",
        "debugging.doctor.image_size=32",
        *overrides,
    )
    return doctor.run_doctor(cfg, name="check"), tmp_path / "4_debugging" / "doctor" / "check"


def test_doctor_report_contract_and_integrity_faults(tiny_dataset, tmp_path):
    result, out = run_doctor(tiny_dataset, tmp_path, "debugging.fault=batch_mixing")
    assert result["top_cause"] == "implementation_bug"
    report = json.loads((out / "report.json").read_text())
    assert report["top_cause"] in (*doctor.CAUSES, *doctor.UNEXPLAINED, "none")
    assert set(report["symptoms"]) == set(doctor.SYMPTOMS)
    assert all(isinstance(s["present"], bool) for s in report["symptoms"].values())
    top = report["causes"][0]
    assert top["present"] and top["rank"] == 1 and top["fix"] and top["evidence"]
    assert (out / "report.md").read_text().startswith("# Doctor report: check")
    assert (out / "curves.png").stat().st_size > 0

    result, _ = run_doctor(tiny_dataset, tmp_path, "debugging.fault=answer_in_input")
    assert result["top_cause"] == "answer_in_input"


def skips_the_update(real_step):
    """A training step with a classic loop bug: the update is computed and never applied (a forgotten
    `optimizer.step()`); the loss it returns is the real one."""

    def step(model, batch, criterion, optimizer, **kwargs):
        before = [p.detach().clone() for p in model.parameters()]
        result = real_step(model, batch, criterion, optimizer, **kwargs)
        with torch.no_grad():
            for p, old in zip(model.parameters(), before, strict=True):
                p.copy_(old)
        return result

    return step


def ascends_the_loss(real_step):
    """Another loop bug: the step backpropagates the negated loss (a score maximized by mistake: gradient
    ascent); the loss it returns and logs is the real one."""

    def step(model, batch, criterion, optimizer, **kwargs):
        def negated(out, b):
            loss, parts = criterion(out, b)
            return -loss, parts

        value, parts = real_step(model, batch, negated, optimizer, **kwargs)
        return -value, parts

    return step


# two constructions of the training-loop class: the update is lost (the development part's), the update
# goes the wrong way (held out: added after the doctor was built, and not tuned on)
@pytest.mark.parametrize("broken", [skips_the_update, ascends_the_loss])
def test_a_broken_training_step_reaches_the_doctor(tiny_dataset, tmp_path, monkeypatch, broken):
    """The doctor trains through the project's training step (`training.train_step`, what `make train` runs),
    so a bug in that step, not in the model or the data, shows in its verdict: nothing learns, the overfit
    test fails, `implementation_bug`. (A doctor with a loop of its own would find the model fine; in our runs
    on this tiny dataset the unbroken step got `unsolvable`, with a passing overfit test.)"""
    monkeypatch.setattr(training, "train_step", broken(training.train_step))
    result, _ = run_doctor(tiny_dataset, tmp_path, "debugging.doctor.thresholds.min_test_size=1")
    assert result["symptoms"]["no_learning"]["present"]
    assert result["top_cause"] == "implementation_bug", result["top_cause"]
    assert not result["checks"]["overfit"]["passed"]


def test_the_loss_reaches_every_parameter_but_in_the_detached_output_fault(tiny_dataset):
    """The init check's `without_gradient`: empty for every zoo config (healthy and every other fault, the
    model variants included), the translation head's parameters exactly when its output is detached."""
    for name in zoo_benchmark.zoo_names():
        overrides = (*tiny_dataset.overrides, "logger=none", "training.batch_size=4")
        cfg = compose(f"experiment=zoo/{name}", *overrides)
        c = training.build(cfg)
        batch = training.to_device(next(iter(c.train_loader)), c.device, cfg)
        unreached = probes.init_statistics(c.model, batch, c.criterion)["without_gradient"]
        if name == "implementation_bug_detached":
            assert unreached and all(n.startswith("trans_head.") for n in unreached), unreached
        else:
            assert unreached == [], (name, unreached)


def test_outputs_that_die_in_training_are_an_implementation_bug(tiny_dataset, tmp_path):
    """The clamped-output fault (a ReLU after the output layer): the screen's run pushes outputs below zero,
    where no parameter can move them; the doctor names `implementation_bug` from the dead-output check."""
    fault = ("debugging.fault=clamped_output", "debugging.doctor.thresholds.min_test_size=1")
    result, _ = run_doctor(tiny_dataset, tmp_path, *fault)
    dead = result["checks"]["dead_outputs"]["dead"]
    assert dead and result["top_cause"] == "implementation_bug", (dead, result["top_cause"])
    assert "output components" in result["causes"][0]["summary"]
    assert result["checks"]["init"]["without_gradient"] == []  # not the init check's finding


def test_a_grown_budget_draws_more_training_samples_the_way_the_screen_did(tiny_dataset):
    """TaskAdapter.more_train_items: `n` items from the training loader (augmented and faulted as the screen's
    own), as many as the training set has when it has fewer."""
    overrides = ("logger=none", "debugging.doctor.n_train=6", "debugging.doctor.image_size=32")
    cfg = compose(*tiny_dataset.overrides, *overrides)
    adapter = TaskAdapter(budget_config(cfg))
    assert len(adapter.train_items) == 6
    more = adapter.more_train_items(12)
    assert len(more) == 12 and set(more[0]) == set(adapter.train_items[0])
    assert more[0]["image"].shape == adapter.train_items[0]["image"].shape == (3, 32, 32)
    # distinct samples, not the screen's six repeated
    assert len({float(item["t"][2]) for item in more}) == 12
    assert len(adapter.more_train_items(1000)) == len(training.build(cfg).train_set)


def test_each_half_of_the_stored_training_set_gives_training_items_of_its_own(tiny_dataset):
    """TaskAdapter.half_train_items: items through the training pipeline (the batch fault applied), every one
    from its half of the training set in stored order, up to `n`, all of that half when it has fewer."""
    overrides = ("logger=none", "debugging.doctor.n_train=6", "debugging.doctor.image_size=32")
    cfg = compose(*tiny_dataset.overrides, *overrides, "debugging.fault=black_level")
    adapter = TaskAdapter(budget_config(cfg))
    train_set = adapter.sets[0]
    cut = len(train_set) // 2
    where = {round(float(train_set[i]["t"].norm()), 3): i for i in range(len(train_set))}
    for half in (0, 1):
        items = adapter.half_train_items(half, 1000)
        assert len(items) == (cut if half == 0 else len(train_set) - cut)
        index = {where[round(float(item["t"].norm()), 3)] for item in items}
        assert len(index) == len(items) and all((i >= cut) == bool(half) for i in index)
        assert all(float(item["image"].min()) >= 1000.0 for item in items)  # the batch fault still applies
        assert items[0]["image"].shape == adapter.train_items[0]["image"].shape
    assert len(adapter.half_train_items(1, 3)) == 3


def test_training_items_without_the_augmentation_and_validation_items_with_it(tiny_dataset):
    """TaskAdapter.unaugmented_train_items: the screen's training items in the same order, as a loader without
    the augmentation yields them (a batch fault still applied): each one's pose is the augmented item's turned
    back about the camera axis. TaskAdapter.augmented_val_items: validation samples turned by the augmentation,
    the batch fault applied after it, as the training pipeline gives its samples."""
    overrides = ("logger=none", "debugging.doctor.n_train=12", "debugging.doctor.image_size=32")
    cfg = compose(
        *tiny_dataset.overrides, *overrides, "training.augment.rotate_deg=180", "debugging.fault=black_level"
    )
    adapter = TaskAdapter(budget_config(cfg))
    assert adapter.augmentation is not None
    plain = adapter.unaugmented_train_items()
    assert len(plain) == len(adapter.train_items) == 12
    train_set = adapter.sets[0]
    stored = {float(train_set[i]["t"].norm()): train_set[i]["R"] for i in range(len(train_set))}
    for turned, item in zip(adapter.train_items, plain, strict=True):
        Q = turned["R"] @ item["R"].T
        torch.testing.assert_close(Q @ Q.T, torch.eye(3))  # turned, not changed otherwise
        assert torch.allclose(turned["t"].norm(), item["t"].norm())  # the same sample
        torch.testing.assert_close(item["R"], stored[float(item["t"].norm())])  # as stored: not turned
        assert float(item["image"].min()) >= 1000.0  # the batch fault still applies
    assert (
        sum(
            float((t["R"] - p["R"]).abs().amax()) > 0.1
            for t, p in zip(adapter.train_items, plain, strict=True)
        )
        >= 10
    )
    # validation samples through the training pipeline: every one a validation sample, turned, the batch fault on
    val_set = adapter.sets[1]
    stored_val = [(val_set[i]["t"], val_set[i]["R"]) for i in range(len(val_set))]
    augmented = adapter.augmented_val_items()
    assert 0 < len(augmented) <= len(adapter.val_items)
    turned = 0
    for item in augmented:
        t, R = min(stored_val, key=lambda s: abs(float(s[0].norm() - item["t"].norm())))
        assert abs(float(t.norm() - item["t"].norm())) < 1e-3  # a validation sample
        Q = item["R"] @ R.T
        torch.testing.assert_close(Q @ Q.T, torch.eye(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(item["t"], Q @ t, atol=1e-3, rtol=0)  # turned as a whole
        assert float(item["image"].min()) >= 1000.0
        turned += float((Q - torch.eye(3)).abs().amax()) > 0.1
    assert turned >= len(augmented) - 1
    off = compose(*tiny_dataset.overrides, *overrides, "training.augment.rotate_deg=0")
    assert TaskAdapter(budget_config(off)).augmentation is None


def test_a_detached_loss_term_is_an_implementation_bug(tiny_dataset, tmp_path):
    """Part of the output never trains while the rest does (the total loss falls): the doctor names
    `implementation_bug` from the parameters the loss does not reach, not from a plateau."""
    fault = ("debugging.fault=detached_output", "debugging.doctor.thresholds.min_test_size=1")
    result, _ = run_doctor(tiny_dataset, tmp_path, *fault)
    assert result["top_cause"] == "implementation_bug", result["top_cause"]
    top = result["causes"][0]
    assert top["id"] == "implementation_bug" and "trans_head.weight" in top["evidence"]["without_gradient"]


@pytest.mark.parametrize(
    "fault, not_memorized",
    [
        ("null", []),
        ("broadcast_target", ["trans", "trans_err_mm"]),
        ("rolled_target", ["rot", "rot_err_deg"]),
    ],
)
def test_the_overfit_test_finds_a_part_whose_loss_term_pairs_another_target(
    tiny_dataset, fault, not_memorized
):
    """The real overfit test on rendered images: a clean model memorizes every part of 8 samples; a loss term
    that compares each prediction with another sample's target (the batch's first, or the previous one) leaves
    that part, measured against each sample's own target, at the level of a constant prediction."""
    cfg = compose(*tiny_dataset.overrides, "logger=none", "debugging.doctor.verbose=false",
                  "debugging.doctor.image_size=32", f"debugging.fault={fault}")  # fmt: skip
    lab = Lab(cfg, TaskAdapter(budget_config(cfg)))
    over = causes.overfit_test(lab)
    parts, stuck = causes.overfit_parts(lab, over)
    assert stuck == not_memorized, {k: round(v["ratio"], 3) for k, v in parts.items()}


def test_doctor_refuses_an_unknown_fault(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="debugging.fault"):
        run_doctor(tiny_dataset, tmp_path, "debugging.fault=gremlins")
    assert not (tmp_path / "4_debugging" / "doctor" / "check").exists()


@pytest.fixture(scope="module")
def zoo_dataset(tmp_path_factory):
    """A freshly captured dataset: as many training images as the doctor's budget uses (n_train), and 400
    validation images, so the test-set check passes unless a config cuts it."""
    return capture_dataset(tmp_path_factory, "zoo_data", 2048, 400, 8)


# `make doctor-benchmark` runs every config of the zoo; this end-to-end test keeps three kinds of verdict: a
# code bug a probe finds, a knob a fix that helps on two seeds finds, and a healthy run that must stay clean
# (five doctors took 25 min on 2 AVX2 cores in float32; CI runs this test on such machines too).
REDUCED_ZOO = [
    ("implementation_bug_input", "implementation_bug"),
    ("lr_too_high", "lr_too_high"),
    ("healthy", "none"),
]


@pytest.fixture(scope="module")
def reduced_zoo(request, zoo_dataset, tmp_path_factory):
    """The doctor's rows for the reduced-zoo configs whose tests were selected (`-k` runs fewer doctors), by
    `make doctor-benchmark`'s own code: two doctors side by side, one torch thread each, seed 0."""
    names = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_reduced_zoo_end_to_end"
    ]
    root = tmp_path_factory.mktemp("reduced_zoo")
    zoo_benchmark.main([f"data.root={zoo_dataset}", f"paths.root={root}", "logger=none", "benchmark.jobs=2",
                        f"benchmark.configs=[{','.join(names)}]", "benchmark.seeds=1", "benchmark.faulty_seeds=1"])  # fmt: skip
    written = json.loads((root / "4_debugging" / "doctor" / "benchmark.json").read_text())
    return {row["config"]: row for row in written["parts"]["zoo"]["rows"]}


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", REDUCED_ZOO)
def test_reduced_zoo_end_to_end(reduced_zoo, name, expected):
    """A few bug-zoo configs through the real doctor on a freshly captured dataset."""
    row = reduced_zoo[name]
    assert row["diagnosed"] == expected, row
