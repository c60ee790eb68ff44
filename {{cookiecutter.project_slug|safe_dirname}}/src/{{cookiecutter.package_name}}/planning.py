"""Stage 1 (planning): the project's requirements, machine-readable, in `1_planning/requirements.yaml`.

Each requirement says which measured number must meet which target, how important it is and why the
downstream user needs it:

    requirements:
      - name: pose_accuracy          # unique
        metric: add_s_01d            # key in 3_training/metrics.json, 5_deployment/latency.json or the service log summary
        op: ">="                     # >=, <=, >, <
        target: 0.5
        priority: must               # must | should
        why: the grasp planner tolerates 10% of the object's diameter
        unit: fraction               # optional
        headline: true               # optional, at most one: the metric error analysis starts from
        sample_fails_when: "add_s_mm >= 0.1 * diameter_mm"   # optional: the per-sample form of the metric

`make plan` validates the file and prints the targets; `make review` (stage 6) checks them.

Validation rules (each violation is one error naming the file, the requirement and the field):
- only the keys above; name/metric/why/unit are non-empty strings, target a finite number (not a bool),
  priority `must`/`should`, op one of `>= <= > <`, headline a bool; names unique; one headline at most.
- a target must be reachable and must be able to fail, given the metric's range. The range comes from
  `unit` (fraction: [0, 1]; percent: [0, 100]; ms, s, MB, mm, cm, m, deg, rad, px, count: >= 0) or, when
  there is no unit, from the metric's name: `acc`, `accuracy`, `auc`, `rate`, `fraction`, `01d`,
  `precision`, `recall`, `f1`, `iou` tokens mean a fraction; `ms`, `s`, `mb`, `mm`, `cm`, `deg`, `px`
  tokens mean a non-negative quantity. Rejected: `>= 1.2` or `< 0` on a fraction (impossible),
  `>= 0` on a fraction or a latency (always true), `<= 0` on an error that can't be negative (asks for
  exact perfection, which a measured error never reaches). Other units have no range check.
- `sample_fails_when` is `COLUMN OP NUMBER` or `COLUMN OP NUMBER * COLUMN` (e.g. `re_deg > 10`,
  `correct == 0`, `add_s_mm >= 0.1 * diameter_mm`): a tiny grammar on purpose, no eval().
"""

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import yaml

from .paths import CONFIG_DIR

OPS = (">=", "<=", ">", "<")
PRIORITIES = ("must", "should")
REQUIRED = ("name", "metric", "op", "target", "priority", "why")
OPTIONAL = ("unit", "headline", "sample_fails_when")

FRACTION_UNITS = {"fraction": 1.0, "percent": 100.0, "%": 100.0}
NON_NEGATIVE_UNITS = {"ms", "s", "mb", "mm", "cm", "m", "deg", "rad", "px", "count"}
FRACTION_TOKENS = {"acc", "accuracy", "auc", "rate", "fraction", "01d", "precision", "recall", "f1", "iou"}
NON_NEGATIVE_TOKENS = {"ms", "s", "mb", "mm", "cm", "deg", "px"}


class RequirementsError(ValueError):
    """requirements.yaml is malformed; the message names the file, the requirement and the field."""


_RULE = re.compile(r"^\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*(?:\*\s*(\w+))?\s*$")
_COMPARE = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


@dataclass(frozen=True)
class SampleRule:
    """`column op value [* scale_column]`: which samples count as errors (see module docstring)."""

    column: str
    op: str
    value: float
    scale_column: str | None = None

    @classmethod
    def parse(cls, text):
        match = _RULE.match(str(text))
        if not match:
            raise ValueError(
                f"per-sample rule {text!r} is not `COLUMN OP NUMBER [* COLUMN]` (e.g. `re_deg > 10`)"
            )
        column, op, number, scale = match.groups()
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"per-sample rule {text!r}: {number!r} is not a number") from None
        return cls(column, op, value, scale)

    @property
    def columns(self):
        return [c for c in (self.column, self.scale_column) if c]

    def fails(self, table):
        """Boolean array: True where a sample fails. `table` maps column name -> 1-D numeric array."""
        import numpy as np

        missing = [c for c in self.columns if c not in table]
        if missing:
            raise ValueError(f"per-sample rule `{self}` needs column(s) {missing}, not in the errors table")
        threshold = (
            self.value * np.asarray(table[self.scale_column], float) if self.scale_column else self.value
        )
        return _COMPARE[self.op](np.asarray(table[self.column], float), threshold)

    def __str__(self):
        scale = f" * {self.scale_column}" if self.scale_column else ""
        return f"{self.column} {self.op} {self.value:g}{scale}"


@dataclass(frozen=True)
class Requirement:
    name: str
    metric: str
    op: str
    target: float
    priority: str
    why: str
    unit: str = ""
    headline: bool = False
    sample_fails_when: SampleRule | None = None

    def met_by(self, value):
        return _COMPARE[self.op](float(value), self.target)

    def describe(self):
        unit = f" {self.unit}" if self.unit and self.unit != "fraction" else ""
        return f"{self.metric} {self.op} {self.target:g}{unit}"


def metric_range(metric, unit=""):
    """(low, high) that the metric can take, or None when unknown (see module docstring)."""
    unit = (unit or "").strip().lower()
    if unit:
        if unit in FRACTION_UNITS:
            return 0.0, FRACTION_UNITS[unit]
        return (0.0, math.inf) if unit in NON_NEGATIVE_UNITS else None
    tokens = set(re.split(r"[_\W]+", metric.lower()))
    if tokens & FRACTION_TOKENS:
        return 0.0, 1.0
    if tokens & NON_NEGATIVE_TOKENS or metric.lower().startswith("latency"):
        return 0.0, math.inf
    return None


def target_problem(op, target, low, high):
    """Why `metric op target` cannot both pass and fail on [low, high]; None when it is a real target."""
    span = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
    if op in (">=", ">"):
        if target > high or (op == ">" and target >= high):
            return f"can never be met: the metric lies in {span}"
        if target < low or (op == ">=" and target <= low):
            return f"is always met: the metric lies in {span}"
    else:
        if target < low or (op == "<" and target <= low):
            return f"can never be met: the metric lies in {span}"
        if op == "<=" and target == low:
            return f"asks for an error of exactly {low:g}, which a measured metric in {span} never reaches"
        if target > high or (op == "<=" and target >= high):
            return f"is always met: the metric lies in {span}"
    return None


def _parse_one(path, index, item):
    where = f"{path}: requirement #{index + 1}"
    if not isinstance(item, dict):
        raise RequirementsError(f"{where}: expected a mapping with keys {', '.join(REQUIRED)}, got {item!r}")
    if isinstance(item.get("name"), str) and item["name"].strip():
        where = f"{path}: requirement '{item['name']}'"
    unknown = sorted(set(item) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise RequirementsError(
            f"{where}: unknown field(s) {unknown} (allowed: {', '.join(REQUIRED + OPTIONAL)})"
        )
    for key in REQUIRED:
        if key not in item:
            raise RequirementsError(f"{where}: field '{key}' is missing")
    for key in ("name", "metric", "why", "unit", "sample_fails_when"):
        if key in item and not (isinstance(item[key], str) and item[key].strip()):
            raise RequirementsError(f"{where}: field '{key}' must be a non-empty string, got {item[key]!r}")
    target = item["target"]
    if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target):
        raise RequirementsError(f"{where}: field 'target' must be a finite number, got {target!r}")
    if item["op"] not in OPS:
        raise RequirementsError(
            f"{where}: field 'op': unknown op {item['op']!r} (use one of {', '.join(OPS)})"
        )
    if item["priority"] not in PRIORITIES:
        raise RequirementsError(
            f"{where}: field 'priority': unknown priority {item['priority']!r} (use must or should)"
        )
    headline = item.get("headline", False)
    if not isinstance(headline, bool):
        raise RequirementsError(f"{where}: field 'headline' must be true or false, got {headline!r}")
    bounds = metric_range(item["metric"], item.get("unit", ""))
    if bounds:
        problem = target_problem(item["op"], float(target), *bounds)
        if problem:
            raise RequirementsError(
                f"{where}: field 'target': `{item['metric']} {item['op']} {target}` {problem}"
            )
    rule = None
    if "sample_fails_when" in item:
        try:
            rule = SampleRule.parse(item["sample_fails_when"])
        except ValueError as err:
            raise RequirementsError(f"{where}: field 'sample_fails_when': {err}") from None
    return Requirement(
        name=item["name"].strip(),
        metric=item["metric"].strip(),
        op=item["op"],
        target=float(target),
        priority=item["priority"],
        why=item["why"].strip(),
        unit=item.get("unit", "").strip(),
        headline=headline,
        sample_fails_when=rule,
    )


def load_requirements(path):
    """Read and validate requirements.yaml -> list[Requirement]; RequirementsError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise RequirementsError(f"{path}: requirements file not found (stage 1 writes it: 1_planning/)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RequirementsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict) or "requirements" not in doc:
        raise RequirementsError(f"{path}: expected a top-level mapping with a 'requirements' list")
    unknown = sorted(set(doc) - {"requirements"})
    if unknown:
        raise RequirementsError(f"{path}: unknown top-level key(s) {unknown} (only 'requirements')")
    items = doc["requirements"]
    if not isinstance(items, list) or not items:
        raise RequirementsError(f"{path}: 'requirements' must be a non-empty list")
    requirements = [_parse_one(path, i, item) for i, item in enumerate(items)]
    seen = set()
    for req in requirements:
        if req.name in seen:
            raise RequirementsError(f"{path}: requirement '{req.name}': field 'name' is duplicated")
        seen.add(req.name)
    headlines = [r.name for r in requirements if r.headline]
    if len(headlines) > 1:
        raise RequirementsError(
            f"{path}: requirement '{headlines[1]}': field 'headline': only one may be true"
        )
    return requirements


def headline(requirements):
    """The requirement marked `headline: true`, else the first one."""
    return next((r for r in requirements if r.headline), requirements[0])


def targets_table(requirements):
    """Markdown table of the targets (what `make plan` prints and the review repeats)."""
    lines = ["| requirement | target | priority | why |", "|---|---|---|---|"]
    for r in requirements:
        mark = " (headline)" if r.headline else ""
        lines.append(f"| {r.name}{mark} | `{r.describe()}` | {r.priority} | {r.why} |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    path = Path(cfg.paths.requirements)
    try:
        requirements = load_requirements(path)
    except RequirementsError as err:
        print(f"plan: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"{path}: {len(requirements)} requirements, headline '{headline(requirements).name}'\n")
    print(targets_table(requirements))


if __name__ == "__main__":
    main()
