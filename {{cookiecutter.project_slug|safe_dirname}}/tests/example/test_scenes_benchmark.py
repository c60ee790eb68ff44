"""`make scenes-benchmark`: the crop pipeline on GT boxes and on detections, the whole frame resized and the
object-centred default, trained for the same budget on one scene capture; its table and files; bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import compose
from {{ cookiecutter.package_name }} import scenes_benchmark
from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT

ROWS = ["crop, GT boxes", "crop, detections", "whole frame resized", "object-centred default"]


@pytest.mark.slow
def test_make_scenes_benchmark_trains_three_pipelines_at_one_budget(scene_dataset, tmp_path):
    overrides = [
        "logger=none",
        f"paths.root={tmp_path}",
        "data.image_size=32",
        "training.batch_size=4",
        "training.threads=1",
        "training.log_predictions=false",
        "model.test_views=1",
        f"training.benchmark.scenes.data_root={scene_dataset.root}",
        "training.benchmark.scenes.epochs=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    out = subprocess.run(
        ["make", "scenes-benchmark", f"PYTHON={sys.executable}", "EXPERIMENT=smoke", f"OVERRIDES={' '.join(overrides)}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "3_training" / "scenes_benchmark.json").read_text())
    report = (tmp_path / "3_training" / "scenes_benchmark.md").read_text()
    assert report in out.stdout  # what it prints is what it writes
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    detections = scene_dataset.root / "detections" / "test.json"
    # what each row really ran: the data and input its checkpoint was trained with, the boxes it was tested on
    assert [(r["data"], r["input"], r["detections"]) for r in result["rows"]] == [
        ("scenes", "crop", None),
        ("scenes", "crop", str(detections)),
        ("scenes", "frame", None),
        ("synthetic", "frame", None),
    ]
    bench = tmp_path / "3_training" / "scenes_benchmark"
    for name, folder in [("crop, GT boxes", "crop"), ("whole frame resized", "frame"), ("object-centred default", "object_centred")]:  # fmt: skip
        config = torch.load(bench / folder / "3_training/checkpoints/last.pt", weights_only=True)["config"]
        assert config["data"]["input"] == rows[name]["input"] and config["data"]["name"] == rows[name]["data"]
    assert not (bench / "crop_detections" / "3_training" / "checkpoints").exists()  # the crop row's model
    # only the detections row was tested on the detections file; it found some boxes, not all the GT ones
    assert [("detection_recall" in r) for r in result["rows"]] == [False, True, False, False]
    assert 0 < rows["crop, detections"]["detection_recall"] <= 1
    # one scene capture for the three scene rows, the given one; the same budget for all four
    assert {rows[n]["data_root"] for n in ROWS[:3]} == {str(scene_dataset.root)}
    assert rows["object-centred default"]["data_root"] == str(bench / "object_centred" / "2_data" / "dataset")
    assert len({(r["train_images"], r["epochs"]) for r in result["rows"]}) == 1
    assert result["rows"][0]["train_images"] > 0 and result["rows"][0]["epochs"] == 2
    assert rows["object-centred default"]["n_test"] == rows["crop, GT boxes"]["n_test"]
    assert set(result["ratio_to_default"]) == set(ROWS[:3])
    for name, folder in [("crop, GT boxes", "crop"), ("object-centred default", "object_centred")]:
        figures = scenes_benchmark.distance_figures(bench / folder / "3_training" / "errors.csv")
        assert rows[name]["te_rel_median"] == figures["te_rel_median"]
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + len(ROWS)  # header, separator, one line per row
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["pipeline", "data", "data.input", "translation target", "test boxes"]
    assert header[5:] == [title for _, title, _ in scenes_benchmark.COLUMNS]
    assert all(len(line.strip("|").split("|")) == len(header) for line in lines)
    for row, line in zip(ROWS, lines[2:], strict=True):
        assert line.startswith(f"| {row} |")
    assert result["machine"]["cpu_model"] in report


def test_distance_figures_are_medians_of_the_error_relative_to_the_distance(tmp_path):
    """Three estimates at 50, 100 and 200 cm with errors 1, 1 and 8 cm: the relative errors are 0.02, 0.01
    and 0.04 (median 0.02, not median error / median distance = 0.01), the median distance 100 cm."""
    path = tmp_path / "errors.csv"
    path.write_text(
        "scene_id,te_cm,t_gt\n"
        "1,1.0,300 0 400\n"  # 500 mm away
        "1,1.0,0 0 1000\n"
        "2,8.0,0 -1200 1600\n"  # 2000 mm away
    )
    figures = scenes_benchmark.distance_figures(path)
    assert figures["distance_cm_median"] == pytest.approx(100.0)
    assert figures["te_rel_median"] == pytest.approx(0.02)


@pytest.fixture
def no_runs(monkeypatch):
    """Bad input must be refused before any run: a run here fails the test at once (not after a capture)."""

    def run_command(module, overrides, log_path):
        raise AssertionError(f"{module} ran: the bad input was not refused first")

    monkeypatch.setattr(scenes_benchmark, "run_command", run_command)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.benchmark.scenes.epochs=0", r"training.benchmark.scenes.epochs must be an integer >= 1"),
        ("training.benchmark.scenes.image_size=[640]", r"training.benchmark.scenes.image_size must be \[width, height\]"),
        ("training.benchmark.scenes.num_scenes.test=0", r"training.benchmark.scenes.num_scenes.test must be"),
    ],
)  # fmt: skip
def test_bad_budget_is_refused_naming_the_key(tmp_path, override, message, no_runs):
    cfg = compose("experiment=smoke", f"paths.root={tmp_path}", override)
    with pytest.raises(ValueError, match=message):
        scenes_benchmark.benchmark(cfg, "smoke")
    assert not (tmp_path / "3_training").exists()  # refused before any run


def test_overrides_that_would_make_the_rows_alike_are_refused(tmp_path, no_runs):
    cfg = compose("experiment=smoke", f"paths.root={tmp_path}")
    with pytest.raises(ValueError, match=r"data.input=frame: the scenes benchmark sets these per run"):
        scenes_benchmark.benchmark(cfg, "smoke", ["logger=none", "data.input=frame"])


def test_a_data_root_that_is_no_scene_capture_is_refused(tmp_path, no_runs):
    (tmp_path / "dataset" / "models").mkdir(parents=True)
    data_root = f"training.benchmark.scenes.data_root={tmp_path / 'dataset'}"
    cfg = compose("experiment=smoke", f"paths.root={tmp_path}", data_root)
    with pytest.raises(FileNotFoundError, match=r"training.benchmark.scenes.data_root=.*not a scene capture"):
        scenes_benchmark.benchmark(cfg, "smoke")
