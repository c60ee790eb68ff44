"""Planning (stage 1): requirements.yaml validation, targets, per-sample rules, `make plan`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from {{ cookiecutter.package_name }}.planning import (
    RequirementsError,
    SampleRule,
    headline,
    load_requirements,
    targets_table,
)

PROJECT = Path(__file__).resolve().parents[1]
MODULE = "{{ cookiecutter.package_name }}.planning"
GOOD = {
    "name": "latency",
    "metric": "latency_ms_p95",
    "op": "<=",
    "target": 50,
    "priority": "must",
    "why": "the control loop runs at 20 Hz",
    "unit": "ms",
}


def write(tmp_path, *items, extra=None):
    path = tmp_path / "requirements.yaml"
    items = [{k: v for k, v in item.items() if v is not None} for item in items]  # None drops a field
    path.write_text(yaml.safe_dump({"requirements": items, **(extra or {})}, sort_keys=False))
    return path


def test_shipped_requirements_are_valid():
    requirements = load_requirements(PROJECT / "1_planning" / "requirements.yaml")
    assert requirements and all(r.why for r in requirements)
    head = headline(requirements)
    assert head.sample_fails_when is not None
    assert any(r.priority == "must" for r in requirements)
    assert "| requirement |" in targets_table(requirements)


def test_a_valid_file_loads(tmp_path):
    accuracy = GOOD | {"name": "acc", "metric": "accuracy", "op": ">=", "target": 0.9, "unit": "fraction"}
    accuracy |= {"headline": True, "sample_fails_when": "correct == 0"}
    (latency, acc) = load_requirements(write(tmp_path, GOOD, accuracy))
    assert latency.met_by(49.9) and not latency.met_by(50.1)
    assert acc.met_by(0.95) and not acc.met_by(0.5)
    assert headline([latency, acc]) is acc and headline([latency]) is latency
    assert latency.describe() == "latency_ms_p95 <= 50 ms"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"colour": "red"}, "colour", "unknown field"),
        ({"target": "fifty"}, "target", "finite number"),
        ({"target": True}, "target", "finite number"),
        ({"op": "=>"}, "op", "unknown op"),
        ({"priority": "nice-to-have"}, "priority", "unknown priority"),
        ({"why": ""}, "why", "non-empty string"),
        ({"headline": "yes"}, "headline", "true or false"),
        ({"target": -5}, "target", "can never be met"),  # negative latency
        ({"target": 0}, "target", "exactly 0"),  # a `<= 0` error asks for perfection
        ({"op": ">=", "target": 0}, "target", "always met"),
        ({"metric": "add_s_01d", "unit": "fraction", "op": ">=", "target": 1.2}, "target", "never be met"),
        ({"metric": "accuracy", "unit": "fraction", "op": "<=", "target": 1}, "target", "always met"),
        # no unit: "recall" is a fraction by its name
        ({"metric": "recall", "unit": None, "op": ">", "target": 1}, "target", "never be met"),
        ({"sample_fails_when": "re_deg >> 10"}, "sample_fails_when", "COLUMN OP NUMBER"),
    ],
)
def test_each_invalid_field_is_named(tmp_path, change, field, message):
    path = write(tmp_path, GOOD | change)
    with pytest.raises(RequirementsError) as err:
        load_requirements(path)
    text = str(err.value)
    assert str(path) in text and "'latency'" in text and f"'{field}'" in text and message in text


def test_missing_field_duplicates_and_headlines(tmp_path):
    missing = {k: v for k, v in GOOD.items() if k != "why"}
    with pytest.raises(RequirementsError, match="requirement 'latency': field 'why' is missing"):
        load_requirements(write(tmp_path, missing))
    with pytest.raises(RequirementsError, match="requirement 'latency': field 'name' is duplicated"):
        load_requirements(write(tmp_path, GOOD, GOOD | {"metric": "latency_ms_p50"}))
    two_heads = [GOOD | {"headline": True}, GOOD | {"name": "other", "headline": True}]
    with pytest.raises(RequirementsError, match="requirement 'other': field 'headline'"):
        load_requirements(write(tmp_path, *two_heads))


def test_file_level_errors(tmp_path):
    with pytest.raises(RequirementsError, match="not found"):
        load_requirements(tmp_path / "absent.yaml")
    with pytest.raises(RequirementsError, match="unknown top-level key"):
        load_requirements(write(tmp_path, GOOD, extra={"version": 2}))
    (tmp_path / "bad.yaml").write_text("requirements: [\n")
    with pytest.raises(RequirementsError, match="not valid YAML"):
        load_requirements(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("requirements: []\n")
    with pytest.raises(RequirementsError, match="non-empty list"):
        load_requirements(tmp_path / "empty.yaml")
    (tmp_path / "item.yaml").write_text("requirements: [just a string]\n")
    with pytest.raises(RequirementsError, match="requirement #1"):
        load_requirements(tmp_path / "item.yaml")


def test_sample_rule():
    rule = SampleRule.parse("add_s_mm >= 0.1 * diameter_mm")
    table = {"add_s_mm": np.array([5.0, 10.0, 30.0]), "diameter_mm": np.array([100.0, 100.0, 100.0])}
    assert rule.fails(table).tolist() == [False, True, True]
    assert str(rule) == "add_s_mm >= 0.1 * diameter_mm"
    assert SampleRule.parse("correct == 0").fails({"correct": np.array([1, 0])}).tolist() == [False, True]
    with pytest.raises(ValueError, match="diameter_mm"):
        rule.fails({"add_s_mm": np.array([1.0])})
    with pytest.raises(ValueError, match="COLUMN OP NUMBER"):
        SampleRule.parse("import os")


def run_plan(tmp_path, requirements):
    pythonpath = os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-m", MODULE, f"paths.root={tmp_path}", f"paths.requirements={requirements}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_make_plan_prints_targets_or_fails_with_one_message(tmp_path):
    done = run_plan(tmp_path, PROJECT / "1_planning" / "requirements.yaml")
    assert done.returncode == 0, done.stderr
    assert "headline" in done.stdout and "| requirement |" in done.stdout
    broken = write(tmp_path, GOOD | {"op": "=>"})
    done = run_plan(tmp_path, broken)
    assert done.returncode == 1
    assert "unknown op" in done.stderr and "Traceback" not in done.stderr


def test_lifecycle_loop_modules_import_nothing_heavy():
    # planning, error analysis and metric review also ship in a bake without the pose example
    code = (
        "import sys\n"
        "import {{ cookiecutter.package_name }}.planning, {{ cookiecutter.package_name }}.metric_review\n"
        "import {{ cookiecutter.package_name }}.debugging.error_analysis\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'roma', '{{ cookiecutter.package_name }}.pose') if m in sys.modules))\n"
    )
    pythonpath = os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
