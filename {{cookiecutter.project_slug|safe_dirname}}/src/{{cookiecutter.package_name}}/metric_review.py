"""Stage 6 (metric review): is what we measured what the users need?

`make review` compares every requirement of `1_planning/requirements.yaml` with what was measured:

- `3_training/metrics.json` (evaluation), `5_deployment/latency.json` (export), and the production
  service log summary (`5_deployment/service_log.jsonl`, read by the deployment package when it exists).
  On a key present in several sources the first wins, in that order.
- A requirement whose metric is in none of them (or is NaN) is "not measured"; a `must` that is not
  measured counts as failing: a gate that passes because nothing was measured is no gate.
- The headline requirement is broken into slices (the task's own, `Task.error_slices`; `slice_<name>`
  columns; any column via `extra_slices`) from the per-sample
  errors CSV, using the headline's `sample_fails_when` rule: a slice's value is the share of its
  samples that pass it.
- Trend: each review appends one line to `6_metric_review/history.jsonl`; the report shows the last
  reviews and, inside a DVC repo, `dvc metrics diff` (best effort, never fails the review).
- Flags the talk's two loops back to planning: the headline metric and a downstream requirement
  disagree (the headline passes while a must fails, or they move in opposite directions since the last
  review) -> "revisit the metric"; the production flagged rate is high -> "revisit the requirements".

Writes `6_metric_review/review.md`, `review.json`, `trend.png`, `slices.png`. Exits 1 when a `must`
fails or is not measured and `metric_review.strict` is true (the default; the DVC stage sets it false).
"""

import json
import math
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
import numpy as np
import yaml
from omegaconf import OmegaConf

from .debugging.error_analysis import ErrorAnalysisError, checklist_items, read_errors
from .files import atomic_path, write_json, write_text
from .paths import CONFIG_DIR, group_defaults
from .planning import RequirementsError, headline, load_requirements, metric_range
from .task import Task, configured_task
from .tracking import start_run


class ReviewError(ValueError):
    """A measurement file is unreadable; the message names it."""


# --- measurements --------------------------------------------------------------------------------------


def _is_number(x):
    return isinstance(x, int | float) and not isinstance(x, bool)


def _finite(values):
    """Only the finite numbers (NaN means not measured; kept out of the JSON outputs)."""
    return {k: float(v) for k, v in values.items() if _is_number(v) and math.isfinite(v)}


def read_flat_json(path):
    """{key: float} of a flat metrics JSON (non-numeric values are skipped); None when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReviewError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ReviewError(f"{path}: expected a flat JSON object of metrics, got {type(data).__name__}")
    return {k: float(v) for k, v in data.items() if _is_number(v)}


def production_summary(path):
    """The service log summary (flat numbers) or None, and a note on what was (not) read."""
    path = Path(path)
    if not path.is_file():
        return None, f"no production log at {path} yet (the deployed service writes it)"
    try:
        from .deployment.feedback import load_service_log
    except ImportError:
        return None, f"{path} exists but this project has no deployment package to read it"
    return _finite(load_service_log(path)), f"production log {path}"


def measurements(settings):
    """Merged {metric: value}, {metric: source file}, notes."""
    metrics, sources, notes = {}, {}, []
    files = [("metrics", settings["metrics"]), ("latency", settings["latency"])]
    for label, path in files:
        values = read_flat_json(path)
        if values is None:
            notes.append(f"{label}: {path} not found")
            continue
        notes.append(f"{label}: {path}")
        for key, value in values.items():
            if key in metrics:
                notes.append(f"{key} is in {sources[key]} and {path}; using {sources[key]}")
                continue
            metrics[key], sources[key] = value, str(path)
    production, note = production_summary(settings["service_log"])
    notes.append(note)
    for key, value in (production or {}).items():
        metrics.setdefault(key, value)
        sources.setdefault(key, str(settings["service_log"]))
    return metrics, sources, notes, production


def check_requirements(requirements, metrics, sources):
    results = []
    for r in requirements:
        value = metrics.get(r.metric)
        measured = value is not None and math.isfinite(value)
        status = ("pass" if r.met_by(value) else "fail") if measured else "not measured"
        results.append(
            {
                "name": r.name,
                "metric": r.metric,
                "target": r.describe(),
                "priority": r.priority,
                "headline": r.headline,
                "value": value if measured else None,
                "source": sources.get(r.metric) if measured else None,
                "status": status,
                "why": r.why,
            }
        )
    return results


def exit_code(results, strict=True):
    """1 when strict and a `must` fails or is not measured, else 0 (failing `should`s only warn)."""
    failing_must = any(r["priority"] == "must" and r["status"] != "pass" for r in results)
    return 1 if strict and failing_must else 0


# --- slices of the headline ----------------------------------------------------------------------------


def bin_labels(values, edges, labels):
    """(label per sample, labels in order) for numeric bins [edges[i], edges[i+1]); NaN -> 'n/a'."""
    index = np.digitize(values, edges[1:-1])
    per_sample = ["n/a" if np.isnan(v) else labels[i] for v, i in zip(values, index, strict=True)]
    return per_sample, [*labels, "n/a"]


def slice_headline(errors_path, req, extra_slices, task=None):
    """Per slice family: [{slice, n, pass_rate (, re_deg_median, te_cm_median)}]; plus a note."""
    if req.sample_fails_when is None:
        return {}, f"headline '{req.name}' has no sample_fails_when: no slices"
    if not Path(errors_path).is_file():
        return {}, f"no per-sample errors at {errors_path}: no slices"
    task = task or Task(None)
    table = read_errors(errors_path, task)
    rule = req.sample_fails_when
    try:
        passing = ~rule.fails({c: table.column(c) for c in rule.columns if c in table.columns})
    except ValueError as err:
        raise ReviewError(f"{errors_path}: {err}") from None
    families = task.error_slices(table)
    # your own task: `slice_<name>` columns of the errors CSV are categorical slices, plus extra_slices
    columns = {c[6:]: (c, None) for c in table.columns if c.startswith("slice_") and len(c) > 6}
    columns |= {c: (c, edges) for c, edges in (extra_slices or {}).items()}
    for family, (column, edges) in columns.items():
        if edges:
            labels = [f"{lo:g}–{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
            families[family] = bin_labels(table.column(column), list(edges), labels)
        else:
            if column not in table.columns:
                raise ReviewError(f"{errors_path}: no column '{column}' to slice by")
            per_sample = [row[column] for row in table.rows]
            families[family] = (per_sample, sorted(set(per_sample)))
    result = {}
    for family, (per_sample, order) in families.items():
        per_sample = np.array(per_sample)
        rows = []
        for label in order:
            mask = per_sample == label
            if not mask.any():
                continue
            row = {"slice": label, "n": int(mask.sum()), "pass_rate": float(passing[mask].mean())}
            for column in task.slice_medians:
                row[f"{column}_median"] = float(np.nanmedian(table.column(column)[mask]))
            rows.append(row)
        result[family] = rows
    note = f"`{rule}` per sample from {errors_path} ({len(table)} samples)"
    if not families:
        note += "; no slice columns: set metric_review.extra_slices ({column: [bin edges]} or {column: null})"
    return result, note


# --- history and trend ---------------------------------------------------------------------------------


def read_history(path):
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from an interrupted write; the rest is still good
        if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict):
            entries.append(entry)
    return entries


def append_history(path, entry):
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")


def direction(op):
    return 1 if op in (">=", ">") else -1


def trend(requirements, history, metrics):
    """Per requirement: previous values (oldest first), current value, change and whether it is better."""
    rows = []
    for r in requirements:
        previous = [_finite(e["metrics"]).get(r.metric) for e in history]
        current = _finite(metrics).get(r.metric)
        last = next((v for v in reversed(previous) if v is not None), None)
        change = None if current is None or last is None else current - last
        better = None if not change else (change * direction(r.op) > 0)
        rows.append(
            {
                "name": r.name,
                "metric": r.metric,
                "previous": previous,
                "current": current,
                "change": change,
                "better": better,
            }
        )
    return rows


def dvc_metrics_diff(root):
    """`dvc metrics diff --md` inside a DVC repo; None when not applicable or it fails (best effort)."""
    if not (Path(root) / ".dvc").is_dir() or os.environ.get("DVC_STAGE"):
        return None  # not a DVC repo, or running as a `dvc repro` stage (the repo is locked by it)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "metrics", "diff", "--md"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    table = done.stdout.strip()
    return table if done.returncode == 0 and len(table.splitlines()) > 2 else None  # header-only: no metrics


# --- the two questions ---------------------------------------------------------------------------------


def disagreements(results, trend_rows, head_name):
    """The headline and downstream requirements telling different stories -> revisit the metric."""
    flags = []
    head = next(r for r in results if r["name"] == head_name)
    downstream = [r for r in results if r["name"] != head_name]
    failing_musts = [r["name"] for r in downstream if r["priority"] == "must" and r["status"] != "pass"]
    if head["status"] == "pass" and failing_musts:
        flags.append(
            f"The headline `{head['target']}` passes but must requirement(s) {', '.join(failing_musts)} do not: "
            "the headline metric does not capture what the downstream user needs."
        )
    musts = [r for r in downstream if r["priority"] == "must"]
    if head["status"] == "fail" and musts and not failing_musts:
        flags.append(
            f"The headline `{head['target']}` fails while every downstream must passes: the headline may be "
            "stricter than (or different from) what the users need."
        )
    head_trend = next(t for t in trend_rows if t["name"] == head_name)
    if head_trend["better"] is not None:
        opposite = [
            t["name"]
            for t in trend_rows
            if t["name"] != head_name and t["better"] is not None and t["better"] != head_trend["better"]
        ]
        if opposite:
            verb = "improved" if head_trend["better"] else "got worse"
            flags.append(
                f"Since the last review the headline {verb} while {', '.join(opposite)} moved the other way."
            )
    return flags


def production_flags(production, alert):
    if not production or not production.get("n_predictions"):
        return []
    rate = production.get("flagged_rate", 0.0)
    if rate > alert:
        return [
            f"{100 * rate:.1f}% of {int(production['n_predictions'])} production predictions were flagged as wrong "
            f"(alert above {100 * alert:.0f}%): performance in the real world isn't great."
        ]
    return []


# --- plots and report ----------------------------------------------------------------------------------


def plot_trend(path, requirements, history, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = [
        r
        for r in requirements
        if any(e["metrics"].get(r.metric) is not None for e in history) or r.metric in metrics
    ]
    if not shown:
        return False
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 2.8), squeeze=False)
    for ax, r in zip(axes[0], shown, strict=True):
        values = [e["metrics"].get(r.metric) for e in history] + [metrics.get(r.metric)]
        x = [i for i, v in enumerate(values) if v is not None]
        ax.plot(x, [values[i] for i in x], "o-", color="tab:blue")
        ax.axhline(
            r.target, ls="--", color="tab:red" if r.priority == "must" else "tab:orange", label=r.describe()
        )
        ax.set_title(r.name, fontsize=9)
        ax.set_xlabel("review #")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def plot_slices(path, slices, req):
    if not slices:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(slices), figsize=(3.4 * len(slices), 3.0), squeeze=False)
    for ax, (family, rows) in zip(axes[0], slices.items(), strict=True):
        ax.bar(range(len(rows)), [row["pass_rate"] for row in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), [row["slice"] for row in rows], rotation=30, ha="right", fontsize=7)
        if metric_range(req.metric, req.unit) == (0.0, 1.0):
            ax.axhline(req.target, ls="--", color="tab:red", label=req.describe())
            ax.legend(fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(
            f"share passing `{req.sample_fails_when}`" if family == next(iter(slices)) else "", fontsize=7
        )
        ax.set_title(family, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def _fmt(value):
    return "—" if value is None else f"{value:.4g}"


def render_review(r):
    status_mark = {"pass": "✅ pass", "fail": "❌ fail", "not measured": "⚠️ not measured"}
    lines = ["# Metric review", "", f"**{r['verdict']}** — {r['generated']}", ""]
    lines += ["## Requirements vs measured (1_planning/requirements.yaml)", ""]
    lines += ["| requirement | target | measured | priority | status | why |", "|---|---|---|---|---|---|"]
    for x in r["requirements"]:
        name = f"{x['name']} (headline)" if x["headline"] else x["name"]
        lines.append(
            f"| {name} | `{x['target']}` | {_fmt(x['value'])} | {x['priority']} | {status_mark[x['status']]} | {x['why']} |"
        )
    lines += ["", "A `must` that is not measured counts as failing; a failing `should` is a warning."]
    lines += ["", "Sources: " + "; ".join(r["notes"]), ""]
    lines += ["## Slices of the headline", ""]
    lines.append(r["slices_note"] + ("; plot: slices.png" if r["plots"].get("slices") else ""))
    for family, rows in r["slices"].items():
        medians = [k for k in rows[0] if k.endswith("_median")]
        lines += ["", f"**{family}**", ""]
        lines += ["| slice | n | pass rate" + "".join(f" | median {k[:-7]}" for k in medians) + " |"]
        lines += ["|---|---|---" + "|---" * len(medians) + "|"]
        for row in rows:
            extra = "".join(f" | {row[k]:.2f}" for k in medians)
            lines.append(f"| {row['slice']} | {row['n']} | {100 * row['pass_rate']:.1f}%{extra} |")
    if r["weak_slices"]:
        lines += ["", "Slices below the headline target: " + ", ".join(r["weak_slices"]) + "."]
    lines += ["", f"## Trend (this review vs the last {r['trend_runs']})", ""]
    lines += ["| requirement | previous reviews (oldest first) | now | change |", "|---|---|---|---|"]
    for t in r["trend"]:
        prev = ", ".join(_fmt(v) for v in t["previous"][-r["trend_runs"] :]) or "—"
        arrow = "" if t["better"] is None else (" (better)" if t["better"] else " (worse)")
        change = "—" if t["change"] is None else f"{t['change']:+.4g}{arrow}"
        lines.append(f"| {t['name']} | {prev} | {_fmt(t['current'])} | {change} |")
    lines.append("")
    lines.append(
        f"History: `{r['history']}` ({r['n_history']} earlier reviews)"
        + ("; plot: trend.png" if r["plots"].get("trend") else "")
    )
    if r["dvc_metrics_diff"]:
        lines += ["", "`dvc metrics diff` (workspace vs HEAD):", "", r["dvc_metrics_diff"]]
    lines += ["", "## The two questions", ""]
    lines.append("1. **Does the metric drive downstream behaviour?**")
    for flag in r["metric_flags"] or ["Headline and downstream requirements agree in this review."]:
        lines.append(f"   - {flag}")
    if r["metric_flags"]:
        lines.append("   - → Revisit the metric in `1_planning/PLAN.md` and `requirements.yaml`.")
    lines.append("2. **Is real-world performance good enough?**")
    production = r["production"]
    if not production:
        lines.append("   - Not known yet: no production feedback (serve the model, flag wrong predictions).")
    else:
        lines.append(
            f"   - {int(production.get('n_predictions', 0))} predictions, {int(production.get('n_flagged', 0))} flagged "
            f"({100 * production.get('flagged_rate', 0.0):.1f}%)."
        )
    for flag in r["production_flags"]:
        lines += [
            f"   - {flag}",
            "   - → Revisit the requirements in `1_planning/requirements.yaml` (faster? more accurate?).",
        ]
    if r["checklist"]:
        lines += ["", "## Checklist served (6_metric_review/CHECKLIST.md)", ""] + [
            f"- {item}" for item in r["checklist"]
        ]
    return "\n".join(lines) + "\n"


def review(settings, requirements_path, root=".", checklist=None, run=None, task=None):
    """The whole review; writes review.md/json, plots, appends history. Returns the review dict."""
    s = group_defaults("metric_review/default") | dict(settings)
    out = Path(s["out"])
    requirements = load_requirements(requirements_path)
    head = headline(requirements)
    metrics, sources, notes, production = measurements(s)
    results = check_requirements(requirements, metrics, sources)
    code = exit_code(results, bool(s["strict"]))
    slices, slices_note = slice_headline(s["errors"], head, s.get("extra_slices"), task)
    weak = []
    if metric_range(head.metric, head.unit) == (0.0, 1.0) and head.op in (">=", ">"):
        weak = [
            f"{fam}: {row['slice']}"
            for fam, rows in slices.items()
            for row in rows
            if not head.met_by(row["pass_rate"])
        ]
    history = read_history(s["history"])
    trend_rows = trend(requirements, history[-int(s["trend_runs"]) :], metrics)

    def names(priority, status):
        return [x["name"] for x in results if x["priority"] == priority and x["status"] == status]

    must_failed, must_unmeasured = names("must", "fail"), names("must", "not measured")
    should_bad = names("should", "fail") + names("should", "not measured")
    problems = [f"failed: {', '.join(must_failed)}"] * bool(must_failed)
    problems += [f"not measured: {', '.join(must_unmeasured)}"] * bool(must_unmeasured)
    verdict = (
        f"FAIL: must requirement(s) {'; '.join(problems)}"
        if problems
        else "PASS: every must requirement is met"
    )
    if should_bad:
        verdict += f" (warning: should requirement(s) not met: {', '.join(should_bad)})"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (UTC needs 3.11)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "generated": now,
        "verdict": verdict,
        "exit_code": code,
        "strict": bool(s["strict"]),
        "requirements": results,
        "headline": head.name,
        "notes": notes,
        "slices": slices,
        "slices_note": slices_note,
        "weak_slices": weak,
        "trend": trend_rows,
        "trend_runs": int(s["trend_runs"]),
        "history": str(s["history"]),
        "n_history": len(history),
        "dvc_metrics_diff": dvc_metrics_diff(root) if s["dvc_diff"] else None,
        "metric_flags": disagreements(results, trend_rows, head.name),
        "production": production,
        "production_flags": production_flags(production, float(s["flagged_rate_alert"])),
        "checklist": checklist or [],
        "plots": {
            "trend": plot_trend(out / "trend.png", requirements, history[-int(s["trend_runs"]) :], metrics),
            "slices": plot_slices(out / "slices.png", slices, head),
        },
    }
    write_json(out / "review.json", result)
    write_text(out / "review.md", render_review(result))
    append_history(
        s["history"],
        {
            "time": now,
            "metrics": _finite(metrics),
            "status": {x["name"]: x["status"] for x in results},
            "exit_code": code,
        },
    )
    if run is not None:
        run.log({f"review/{k}": v for k, v in _finite(metrics).items()})
        columns = ["name", "metric", "target", "value", "priority", "status"]
        run.log_table("review/requirements", [[x[c] for c in columns] for x in results], columns)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    settings = OmegaConf.to_container(cfg.metric_review, resolve=True)
    run = start_run(cfg, "metric_review")
    try:
        result = review(
            settings,
            cfg.paths.requirements,
            root=cfg.paths.root,
            checklist=checklist_items(Path(cfg.paths.metric_review) / "CHECKLIST.md"),
            run=run,
            task=configured_task(cfg),
        )
    except (ReviewError, RequirementsError, ErrorAnalysisError, yaml.YAMLError) as err:
        print(f"review: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        run.finish()
    print(result["verdict"])
    for flag in result["metric_flags"] + result["production_flags"]:
        print(f"  ! {flag}")
    print(f"report: {Path(settings['out']) / 'review.md'}")
    sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()
