"""Error analysis (stage 4): selection, eyeball/blackbox split, ceilings, tag sheet round trip, pose tags."""

import csv
import json
import random

import numpy as np
import pytest

from {{ cookiecutter.package_name }}.debugging import error_analysis as ea
{%- if cookiecutter.include_example == "yes" %}
from {{ cookiecutter.package_name }}.pose import errors as pose_errors
from {{ cookiecutter.package_name }}.pose.task import PoseTask
{%- endif %}

K = "500 0 320 0 500 240 0 0 1"
EYE = "1 0 0 0 1 0 0 0 1"


def write_csv(path, rows):
    columns = list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_sheet(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def generic_rows(n=200, n_errors=20, dog_errors=1):
    """The talk's cat classifier: n samples, n_errors wrong, dog_errors of those are dogs."""
    rows = []
    for i in range(n):
        wrong = i < n_errors
        tag_dog = int(wrong and i < dog_errors)
        rows.append({"id": f"img{i:04d}", "correct": 0 if wrong else 1, "tag_dog": tag_dog})
    return rows


def test_ceiling_is_the_talks_arithmetic():
    # 10% error, 5 of 100 sampled errors are dogs -> at best 9.5% error, a 5% relative decrease.
    assert ea.ceiling(0.10, 5 / 100) == pytest.approx(0.095)
    assert 1 - ea.ceiling(0.10, 0.05) / 0.10 == pytest.approx(0.05)


def test_talks_dog_example_end_to_end(tmp_path):
    errors = write_csv(tmp_path / "errors.csv", generic_rows(n=1000, n_errors=100, dog_errors=5))
    settings = {"fail_when": "correct == 0", "eyeball_fraction": 1.0, "n_sample": 100}
    analysis = ea.analyze(errors, tmp_path / "out", settings=settings)
    assert analysis["error_rate"]["dev"] == pytest.approx(0.10)
    (dog,) = [c for c in analysis["categories"] if c["category"] == "dog"]
    assert dog["count"] == 5 and dog["pct"] == pytest.approx(5.0)
    assert dog["best_error_pct"] == pytest.approx(9.5) and dog["relative_pct"] == pytest.approx(5.0)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "10.0% → 9.50%" in report
    assert "no contact sheet" in analysis["contact_sheet"]["note"]
    assert not (tmp_path / "out" / "contact_sheet.png").exists()


def test_split_is_reproducible_disjoint_and_order_independent():
    keys = [f"s{i}" for i in range(500)]
    failing = np.array([i % 3 == 0 for i in range(500)])
    eyeball, sampled = ea.split_and_sample(keys, failing, 0.5, 40, seed=7)
    eyeball2, sampled2 = ea.split_and_sample(keys, failing, 0.5, 40, seed=7)
    assert (eyeball == eyeball2).all() and (sampled == sampled2).all()
    blackbox = ~eyeball
    assert not (eyeball & blackbox).any() and (eyeball | blackbox).all()
    assert 150 < eyeball.sum() < 350
    assert len(sampled) == 40 and eyeball[sampled].all() and failing[sampled].all()
    # shuffling the rows keeps every sample on its side and the same errors sampled
    order = list(range(500))
    random.Random(0).shuffle(order)
    eyeball3, sampled3 = ea.split_and_sample([keys[i] for i in order], failing[order], 0.5, 40, seed=7)
    assert {keys[order[i]] for i in np.flatnonzero(eyeball3)} == {keys[i] for i in np.flatnonzero(eyeball)}
    assert {keys[order[i]] for i in sampled3} == {keys[i] for i in sampled}
    other, _ = ea.split_and_sample(keys, failing, 0.5, 40, seed=8)
    assert (other != eyeball).any()


def test_error_rule_from_the_headline_requirement(tmp_path):
    (tmp_path / "req.yaml").write_text(
        "requirements:\n"
        "  - {name: acc, metric: accuracy, op: '>=', target: 0.9, priority: must, why: users,\n"
        "     headline: true, sample_fails_when: 'correct == 0'}\n"
    )
    table = ea.read_errors(write_csv(tmp_path / "errors.csv", generic_rows(n=50, n_errors=5)))
    failing, rule = ea.select_errors(table, ea._merge_settings({}), tmp_path / "req.yaml")
    assert failing.sum() == 5 and "correct == 0" in rule and "'acc'" in rule
    worst = ea._merge_settings({"select": "worst", "worst_n": 3, "worst_by": "tag_dog"})
    failing, rule = ea.select_errors(table, worst, None)
    assert failing.sum() == 3


def test_missing_rule_and_bad_column_are_clear_errors(tmp_path):
    errors = write_csv(tmp_path / "errors.csv", generic_rows(n=20, n_errors=2))
    with pytest.raises(ea.ErrorAnalysisError, match="fail_when"):
        ea.analyze(errors, tmp_path / "out", requirements_path=tmp_path / "absent.yaml")
    with pytest.raises(ea.ErrorAnalysisError, match="no_such_column"):
        ea.analyze(errors, tmp_path / "out", settings={"fail_when": "no_such_column > 1"})
    with pytest.raises(ea.ErrorAnalysisError, match="not found"):
        ea.analyze(tmp_path / "nope.csv", tmp_path / "out", settings={"fail_when": "correct == 0"})


def test_tag_sheet_keeps_user_columns_and_edits_across_reruns(tmp_path):
    rows = generic_rows(n=60, n_errors=12, dog_errors=4)
    errors = write_csv(tmp_path / "errors.csv", rows)
    out = tmp_path / "out"
    settings = {"fail_when": "correct == 0", "eyeball_fraction": 1.0}
    ea.analyze(errors, out, settings=settings)
    sheet = read_sheet(out / "tags.csv")
    assert len(sheet) == 12 and list(sheet[0])[:2] == ["n", "key"] and list(sheet[0])[-1] == "comments"
    dogs = [r["key"] for r in sheet if r["dog"] == "x"]
    assert len(dogs) == 4
    # The user: unmarks one automatic dog, marks a non-dog as dog, adds a new category and a comment.
    by_key = {r["key"]: r for r in sheet}
    by_key[dogs[0]]["dog"] = ""
    not_dog = next(k for k in by_key if k not in dogs)
    by_key[not_dog]["dog"] = "x"
    for r in sheet:
        r["instagram_filter"] = "x" if r["key"] in (dogs[1], not_dog) else ""
    by_key[dogs[1]]["comments"] = "pitbull, sepia filter"
    write_csv(out / "tags.csv", sheet)

    analysis = ea.analyze(errors, out, settings=settings)
    again = {r["key"]: r for r in read_sheet(out / "tags.csv")}
    assert again[dogs[0]]["dog"] in ("", "0") and again[not_dog]["dog"] == "x"
    assert again[dogs[1]]["comments"] == "pitbull, sepia filter"
    assert again[dogs[1]]["instagram_filter"] == "x" and again[dogs[2]]["instagram_filter"] == ""
    stats = {c["category"]: c for c in analysis["categories"]}
    assert stats["dog"]["count"] == 4 and stats["instagram_filter"]["count"] == 2
    assert stats["instagram_filter"]["source"] == "manual" and analysis["manual_edits"] == 2
    assert "instagram_filter" in (out / "report.md").read_text()

    # The automatic tags change (new evaluation): untouched cells follow, manual marks still win.
    for r in rows:
        r["tag_dog"] = 1 if r["correct"] == 0 else 0
    write_csv(errors, rows)
    ea.analyze(errors, out, settings=settings)
    third = {r["key"]: r for r in read_sheet(out / "tags.csv")}
    assert third[dogs[0]]["dog"] == "0"  # manual unmark overrides auto
    assert all(third[k]["dog"] == "x" for k in third if k != dogs[0])
    assert third[dogs[1]]["instagram_filter"] == "x"
    state = json.loads((out / "tags_state.json").read_text())
    assert state["manual"][dogs[0]]["dog"] is False

    # A new evaluation fixes the commented error: its row leaves the sheet but is parked, not lost.
    fixed = int(dogs[1][3:])
    rows[fixed]["correct"] = 1
    write_csv(errors, rows)
    analysis = ea.analyze(errors, out, settings=settings)
    assert dogs[1] not in {r["key"] for r in read_sheet(out / "tags.csv")} and analysis["parked_rows"] == 1
    rows[fixed]["correct"] = 0  # and the next model gets it wrong again
    write_csv(errors, rows)
    ea.analyze(errors, out, settings=settings)
    back = {r["key"]: r for r in read_sheet(out / "tags.csv")}[dogs[1]]
    assert back["comments"] == "pitbull, sepia filter" and back["instagram_filter"] == "x"
{%- if cookiecutter.include_example == "yes" %}


# --- pose tags ------------------------------------------------------------------------------------


def rot(x=0.0, y=0.0, z=0.0):
    import roma
    import torch

    R = roma.euler_to_rotmat("xyz", torch.tensor([x, y, z], dtype=torch.float64), degrees=True).numpy()
    return " ".join(f"{v:.9f}" for v in R.ravel())


def pose_row(i, **overrides):
    row = {
        "scene_id": 0, "im_id": i, "obj_id": 1, "gt_id": 0, "rgb_path": f"rgb/{i:06d}.png",
        "re_deg": 20.0, "te_cm": 2.0, "add_mm": 30.0, "adds_mm": 30.0, "diameter_mm": 100.0, "symmetric": 0,
        "visib_fract": 1.0, "R_gt": EYE, "t_gt": "0 0 400", "R_pred": rot(z=20), "t_pred": "10 0 400", "K": K,
    }  # fmt: skip
    row.update(overrides)
    return row


CASES = {
    "near_symmetry": {"symmetric": 1, "add_mm": 60.0, "adds_mm": 4.0},
    "euler_wrap": {"R_gt": rot(x=172)},
    "gimbal_lock": {"R_gt": rot(y=84)},
    "far_small": {"t_gt": "0 0 2000"},
    "truncated": {"t_gt": "220 0 400"},
    "occluded": {"visib_fract": 0.3},
    "extreme_view": {"R_gt": rot(x=180)},
    "low_light": {"brightness": 0.1},
    "blurry": {"blur_px": 3.0},
}


@pytest.mark.parametrize("category", list(CASES))
def test_each_automatic_pose_tag(tmp_path, category):
    extra = {"brightness": 0.8, "blur_px": 0.0}
    rows = [pose_row(0, **extra), pose_row(1, **(extra | CASES[category]))]
    table = ea.read_errors(write_csv(tmp_path / "errors.csv", rows), PoseTask(None))
    assert pose_errors.has_pose_columns(table)
    tags = pose_errors.pose_tags(table, ea._merge_settings({})["tags"])
    assert not any(values[0] for values in tags.values()), {c: v[0] for c, v in tags.items()}
    assert tags[category][1]


def test_pose_rule_uses_add_s(tmp_path):
    rows = [
        pose_row(0, add_mm=50.0, adds_mm=5.0, symmetric=1),  # symmetric: ADD-S 5 mm < 10 mm passes
        pose_row(1, add_mm=50.0, adds_mm=5.0, symmetric=0),  # asymmetric: ADD 50 mm fails
        pose_row(2, add_mm=9.0, adds_mm=9.0),
    ]
    table = ea.read_errors(write_csv(tmp_path / "errors.csv", rows), PoseTask(None))
    settings = ea._merge_settings({"fail_when": "add_s_mm >= 0.1 * diameter_mm"})
    failing, _ = ea.select_errors(table, settings, None)
    assert failing.tolist() == [False, True, False]


def test_contact_sheet_and_report_from_pose_errors(tmp_path):
    from PIL import Image

    (tmp_path / "rgb").mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (640, 480), (40, 40, 40)).save(tmp_path / "rgb" / f"{i:06d}.png")
        rows.append(pose_row(i, add_mm=5.0 if i % 2 else 40.0, visib_fract=0.5 if i % 4 == 0 else 1.0))
    errors = write_csv(tmp_path / "errors.csv", rows)
    settings = {
        "fail_when": "add_s_mm >= 0.1 * diameter_mm",
        "eyeball_fraction": 1.0,
        "contact_sheet": {"thumb_px": 64},
    }
    analysis = ea.analyze(
        errors, tmp_path / "out", settings=settings, search_dirs=[tmp_path], task=PoseTask(None)
    )
    assert analysis["n_errors"] == 6 and analysis["contact_sheet"]["tiles"] == 6
    sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
    pixels = np.asarray(sheet)
    red, green = pixels[..., 0].astype(int), pixels[..., 1].astype(int)
    assert ((green > 200) & (red < 100)).any(), "GT axes (green) missing"
    assert ((red > 200) & (green < 100)).any(), "predicted axes (red) missing"
    occluded = next(c for c in analysis["categories"] if c["category"] == "occluded")
    assert occluded["count"] == 3 and occluded["dev_set_pct"] == pytest.approx(25.0)


def test_missing_or_corrupt_images_skip_the_contact_sheet(tmp_path):
    (tmp_path / "rgb").mkdir()
    (tmp_path / "rgb" / "000000.png").write_bytes(b"not a png")
    rows = [pose_row(i, add_mm=40.0) for i in range(3)]  # 000001.png and 000002.png do not exist
    errors = write_csv(tmp_path / "errors.csv", rows)
    settings = {"fail_when": "add_s_mm >= 0.1 * diameter_mm", "eyeball_fraction": 1.0}
    analysis = ea.analyze(
        errors, tmp_path / "out", settings=settings, search_dirs=[tmp_path], task=PoseTask(None)
    )
    assert analysis["contact_sheet"]["tiles"] == 0 and "could be read" in analysis["contact_sheet"]["note"]
    assert not (tmp_path / "out" / "contact_sheet.png").exists()
    assert "could be read" in (tmp_path / "out" / "report.md").read_text()
{%- endif %}
