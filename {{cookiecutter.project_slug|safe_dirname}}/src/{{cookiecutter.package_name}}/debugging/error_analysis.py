"""Stage 4 (debugging): error analysis, the talk's way (Andrew Ng's procedure).

`make analyze` reads a per-sample errors CSV (default `3_training/errors.csv`, one row per dev/test
sample) and:

1. selects the errors: samples that fail the headline requirement's per-sample rule
   (`sample_fails_when` in `1_planning/requirements.yaml`, e.g. `add_s_mm >= 0.1 * diameter_mm`),
   or `fail_when=...` given here, or (`select=worst`) the worst `worst_n` samples by `worst_by`;
2. splits the dev set into an EYEBALL subset (you look at its errors) and a BLACKBOX subset (you never
   do). Ng's reason: after a few rounds of looking, your ideas are tuned to the eyeball examples; if the
   eyeball error rate falls much faster than the blackbox one, you have overfit what you looked at and
   need a fresh eyeball set. The split is by a seeded hash of each sample's id, so it is reproducible,
   independent of row order, and a sample stays on its side when the CSV is regenerated;
3. samples ~100 eyeball errors (again by seeded hash: the same errors stay sampled across re-runs) and
   tags each with categories; writes the tag sheet `tags.csv`, one row per sampled error, one column
   per category ("x" = yes), a comments column;
4. reports per category the "% of total" and the CEILING: with error rate X and a category covering a
   fraction f of the sampled errors, fixing all of them gives at best Y = X * (1 - f), a relative
   improvement of f (the talk: 10% error, 5 of 100 are dogs -> at best 9.5%, 5% relative).

The tag sheet is yours to edit: mark or unmark cells, add NEW COLUMNS for categories you find while
looking, write comments, then re-run. Precedence: a cell you changed from what the tool last wrote is
a manual mark and always wins over the automatic tag (`0`, `no`, `-` or an empty cell unmarks; any other
text marks); untouched cells follow the automatic tags (which change when thresholds change); your own
columns and comments are kept verbatim. What the tool last wrote is kept in `tags_state.json` (delete
it and tags.csv to start over; without it every cell that differs from the automatic tag is kept as
manual). A row you edited that drops out of the sample (a new model no longer gets it wrong) is parked
in tags_state.json and comes back with your marks if it is sampled again.

Automatic categories: any 0/1 column named `tag_<category>` in the errors CSV, plus the configured task's
own (`Task.error_tags`, thresholds in `debugging.error_analysis.tags`).

Outputs in `4_debugging/error_analysis/`: report.md, analysis.json, tags.csv, tags_state.json and, when
the errors CSV names readable images (the task's `image_column`), contact_sheet.png.
"""

import csv
import hashlib
import io
import json
import math
import sys
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
import yaml
from omegaconf import OmegaConf

from ..files import atomic_path, write_json, write_text
from ..paths import CONFIG_DIR, group_defaults
from ..planning import RequirementsError, SampleRule, headline, load_requirements
from ..task import Task, configured_task
from ..tracking import start_run

FALSE_MARKS = {"", "0", "no", "n", "false", "-"}


class ErrorAnalysisError(ValueError):
    """Bad input to error analysis; the message names the file or setting."""


# --- the errors table ----------------------------------------------------------------------------------


class ErrorsTable:
    """The errors CSV: `rows` (list of dicts of strings), `keys` (one id per row), numeric columns."""

    def __init__(self, path, rows, columns, task=None):
        self.path, self.rows, self.columns = Path(path), rows, list(columns)
        self.task = task or Task(None)
        self.keys = [self._key(i, row) for i, row in enumerate(rows)]
        dupes = [k for k, count in Counter(self.keys).items() if count > 1]
        if dupes:
            raise ErrorAnalysisError(f"{self.path}: duplicate sample ids {sorted(dupes)[:5]}")
        self._numeric = {}
        self.task.error_columns(self)

    def _key(self, index, row):
        ids = self.task.sample_id_columns
        if ids and all(c in row for c in ids):
            return "/".join(row[c] for c in ids)
        for column in ("id", "sample_id"):
            if column in row:
                return row[column]
        return f"row{index}"

    def __len__(self):
        return len(self.rows)

    def column(self, name):
        if name not in self._numeric:
            if name not in self.columns:
                raise ErrorAnalysisError(
                    f"{self.path}: no column '{name}' (columns: {', '.join(self.columns)})"
                )
            try:
                self._numeric[name] = np.array([_number(r[name]) for r in self.rows], float)
            except ValueError as err:
                raise ErrorAnalysisError(f"{self.path}: column '{name}': {err}") from None
        return self._numeric[name]

    def set_column(self, name, values):
        self._numeric[name] = np.asarray(values, float)
        if name not in self.columns:
            self.columns.append(name)
            for row, v in zip(self.rows, values, strict=True):
                row[name] = f"{float(v):.6g}"

    def matrices(self, name, shape):
        try:
            return np.array([np.array(r[name].split(), float).reshape(shape) for r in self.rows])
        except (ValueError, KeyError) as err:
            raise ErrorAnalysisError(
                f"{self.path}: column '{name}' is not {shape} row-major floats: {err}"
            ) from None


def _number(text):
    text = str(text).strip().lower()
    if text in ("true", "false"):
        return float(text == "true")
    return float(text) if text not in ("", "nan") else math.nan


def read_errors(path, task=None):
    path = Path(path)
    if not path.is_file():
        raise ErrorAnalysisError(f"{path}: errors CSV not found (the evaluation of stage 3 writes it)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    if not rows:
        raise ErrorAnalysisError(f"{path}: no samples in the errors CSV")
    return ErrorsTable(path, rows, columns, task)


# --- selection and the eyeball / blackbox split -------------------------------------------------------


def unit_hash(seed, key):
    """A number in [0, 1) fixed by (seed, key): seeded, order-independent, stable across runs/machines."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def error_rule(settings, requirements_path):
    """The per-sample rule that makes a sample an error, and where it came from."""
    if settings.get("fail_when"):
        try:
            return SampleRule.parse(settings["fail_when"]), "fail_when setting"
        except ValueError as err:
            raise ErrorAnalysisError(f"debugging.error_analysis.fail_when: {err}") from None
    if requirements_path is None or not Path(requirements_path).is_file():
        raise ErrorAnalysisError(
            f"no per-sample error rule: {requirements_path} not found; set debugging.error_analysis.fail_when "
            "(e.g. 're_deg > 10') or select=worst"
        )
    req = headline(load_requirements(requirements_path))
    if req.sample_fails_when is None:
        raise ErrorAnalysisError(
            f"{requirements_path}: requirement '{req.name}' (the headline) has no 'sample_fails_when'; add one "
            "or set debugging.error_analysis.fail_when / select=worst"
        )
    return req.sample_fails_when, f"headline requirement '{req.name}' ({req.describe()})"


def select_errors(table, settings, requirements_path):
    """Boolean array over the table's rows: True = error. Also returns a description of the rule."""
    if settings["select"] == "worst":
        values = table.column(settings["worst_by"])
        n = min(int(settings["worst_n"]), len(table))
        order = np.argsort(-np.nan_to_num(values, nan=np.inf), kind="stable")
        failing = np.zeros(len(table), bool)
        failing[order[:n]] = True
        return failing, f"the worst {n} samples by {settings['worst_by']}"
    if settings["select"] != "threshold":
        raise ErrorAnalysisError(
            f"debugging.error_analysis.select={settings['select']!r}: use threshold or worst"
        )
    rule, source = error_rule(settings, requirements_path)
    try:
        failing = rule.fails({c: table.column(c) for c in rule.columns if c in table.columns})
    except ValueError as err:
        raise ErrorAnalysisError(f"{table.path}: {err}") from None
    return failing, f"`{rule}` (from the {source})"


def split_and_sample(keys, failing, eyeball_fraction, n_sample, seed):
    """(eyeball mask, sampled row indices): Ng's eyeball/blackbox split and ~n sampled eyeball errors."""
    if not 0 < eyeball_fraction <= 1:
        raise ErrorAnalysisError(
            f"debugging.error_analysis.eyeball_fraction={eyeball_fraction}: must be in (0, 1]"
        )
    eyeball = np.array([unit_hash(f"{seed}:split", k) < eyeball_fraction for k in keys], bool)
    candidates = np.flatnonzero(eyeball & failing)
    order = sorted(candidates, key=lambda i: unit_hash(f"{seed}:sample", keys[i]))
    return eyeball, np.array(sorted(order[: int(n_sample)]), int)


def ceiling(error_rate, fraction):
    """Best error after fixing every error of a category covering `fraction` of them: X * (1 - f)."""
    return error_rate * (1.0 - fraction)


# --- automatic tags ------------------------------------------------------------------------------------


def generic_tags(table):
    """`tag_<category>` 0/1 columns of the errors CSV -> {category: bool array}."""
    tags = {}
    for name in table.columns:
        if name.startswith("tag_") and len(name) > 4:
            tags[name[4:]] = np.nan_to_num(table.column(name)) > 0.5
    return tags


def _find_image(path_text, search_dirs):
    path = Path(path_text)
    for candidate in [path, *(Path(d) / path for d in search_dirs)]:
        if candidate.is_file():
            return candidate
    return None


def contact_sheet(table, indices, out_path, settings, search_dirs):
    """The sampled errors' images (the task's `image_column`), annotated by the task (`draw_error`; the pose
    example draws GT and predicted axes), numbered, in one PNG grid (torchvision make_grid).
    Returns (number of tiles, note)."""
    column = table.task.image_column
    if not column or column not in table.columns:
        return 0, f"no contact sheet: the errors CSV has no image column ({column})"
    try:
        import torch
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import resize
        from torchvision.utils import draw_bounding_boxes, make_grid
    except ImportError as err:
        return 0, f"no contact sheet: {err.name} is not installed"
    sheet = settings["contact_sheet"]
    chosen = list(indices)[: int(sheet["max_images"])]
    tiles, missing = [], 0
    thumb = int(sheet["thumb_px"])
    for n, i in enumerate(chosen, start=1):
        path = _find_image(table.rows[i][column], search_dirs)
        try:
            image = decode_image(str(path), mode=ImageReadMode.RGB) if path else None
        except (RuntimeError, OSError):  # unreadable or corrupt image: counted like a missing one
            image = None
        if image is None:
            missing += 1
            continue
        h, w = image.shape[-2:]
        thumbnail = resize(image, [thumb, thumb], antialias=True)
        image = table.task.draw_error(thumbnail, table, i, (thumb / w, thumb / h))
        box = torch.tensor([[0, 0, thumb - 1, thumb - 1]], dtype=torch.float32)
        image = draw_bounding_boxes(image, box, labels=[f"#{n}"], colors="white")
        tiles.append(image)
    if not tiles:
        return 0, f"no contact sheet: none of the {len(chosen)} sampled images could be read ({column})"
    grid = make_grid(tiles, nrow=int(sheet["nrow"]), padding=2, pad_value=0)
    with atomic_path(out_path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    note = f"{len(tiles)} tiles, numbered as the `n` column of tags.csv" + table.task.contact_sheet_legend
    return len(tiles), note + (f"; {missing} images missing or unreadable" if missing else "")


# --- the tag sheet -------------------------------------------------------------------------------------


def is_marked(text):
    return str(text).strip().lower() not in FALSE_MARKS


def _read_sheet(path):
    if not path.is_file():
        return [], {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    if rows and "key" not in columns:
        raise ErrorAnalysisError(
            f"{path}: the tag sheet lost its 'key' column; restore it or delete the file"
        )
    return columns, {r["key"]: r for r in rows}


def merge_tag_sheet(sheet_path, state_path, sample_rows, info_columns, auto):
    """Merge the automatic tags of the sampled errors with the user's sheet (see the module docstring).

    sample_rows: list of (key, {info column: text}); auto: {category: {key: bool}}.
    Returns (columns, rows, categories, manual_edits, state): categories maps name -> "auto" | "manual",
    manual_edits counts cells where a manual mark differs from the automatic tag, state goes to tags_state.json.
    """
    old_columns, old_rows = _read_sheet(sheet_path)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    written, manual_state = state.get("written", {}), state.get("manual", {})
    fixed = {"n", "key", "comments", *info_columns, *state.get("info_columns", [])}
    user_columns = [c for c in old_columns if c not in fixed and c not in auto]
    columns = ["n", "key", *info_columns, *auto, *user_columns, "comments"]
    # Rows with your marks that are no longer sampled (a new evaluation changed the errors) are parked in
    # the state file, not lost: they come back, marks and comments included, when sampled again.
    parked = state.get("parked", {})
    sampled = {key for key, _ in sample_rows}
    for key, old in old_rows.items():
        edited = (
            key in manual_state
            or any(old.get(c) for c in [*user_columns, "comments"])
            or any(c in old and is_marked(old[c]) != is_marked(written.get(key, {}).get(c, "")) for c in auto)
        )
        if key not in sampled and edited:
            parked[key] = {"row": old, "written": written.get(key, {}), "manual": manual_state.get(key, {})}
    rows, new_written, new_manual, manual_edits = [], {}, {}, 0
    for n, (key, info) in enumerate(sample_rows, start=1):
        restored = parked.pop(key, None)
        if key not in old_rows and restored:
            written[key], manual_state[key] = restored["written"], restored["manual"]
        old = old_rows.get(key) or (restored or {}).get("row", {})
        row = {"n": str(n), "key": key, **info}
        for category, values in auto.items():
            automatic = bool(values[key])
            manual = manual_state.get(key, {}).get(category)
            cell = old.get(category)
            if cell is not None:
                before = written.get(key, {}).get(category)
                if before is not None and is_marked(cell) != is_marked(before):
                    manual = is_marked(cell)  # the user changed what the tool wrote
                elif before is None and is_marked(cell) != automatic:
                    manual = is_marked(cell)  # no record of what was written: keep the user's mark
            final = automatic if manual is None else manual
            row[category] = "x" if final else ("0" if automatic else "")
            new_written.setdefault(key, {})[category] = row[category]
            if manual is not None:
                new_manual.setdefault(key, {})[category] = manual
                manual_edits += manual != automatic
        for column in user_columns + ["comments"]:
            row[column] = old.get(column) or ""
        rows.append(row)
    categories = {c: "auto" for c in auto} | {c: "manual" for c in user_columns}
    new_state = {
        "info_columns": list(info_columns),
        "written": new_written,
        "manual": new_manual,
        "parked": parked,
    }
    return columns, rows, categories, manual_edits, new_state


def _csv_text(columns, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --- the analysis --------------------------------------------------------------------------------------


def checklist_items(path, section=None):
    """The `- [ ]` items of a CHECKLIST.md (under the heading containing `section`, when given)."""
    path = Path(path)
    if not path.is_file():
        return []
    items, inside = [], section is None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            inside = section is None or section.lower() in line.lower()
        elif inside and line.lstrip().startswith("- ["):
            items.append(line.strip()[6:].strip())
    return items


def analyze(
    errors_path,
    out_dir,
    requirements_path=None,
    settings=None,
    search_dirs=(),
    checklist=None,
    run=None,
    task=None,
):
    """Run the whole analysis; returns the analysis dict (also written to out_dir/analysis.json).
    `task` (task.Task) adds its derived columns, automatic tags and contact-sheet drawing."""
    s = _merge_settings(settings or {})
    out_dir = Path(out_dir)
    table = read_errors(errors_path, task)
    failing, rule_text = select_errors(table, s, requirements_path)
    eyeball, sampled = split_and_sample(
        table.keys, failing, float(s["eyeball_fraction"]), s["n_sample"], s["seed"]
    )
    blackbox = ~eyeball
    rate = float(failing.mean())
    rates = {
        "dev": rate,
        "eyeball": float(failing[eyeball].mean()) if eyeball.any() else math.nan,
        "blackbox": float(failing[blackbox].mean()) if blackbox.any() else math.nan,
    }
    auto_all = generic_tags(table) | table.task.error_tags(table, s.get("tags") or {})
    keys = [table.keys[i] for i in sampled]
    auto = {c: {table.keys[i]: bool(v[i]) for i in sampled} for c, v in auto_all.items()}
    if table.task.sheet_columns is not None:
        info_columns = [c for c in table.task.sheet_columns if c in table.columns]
    else:
        info_columns = [c for c in table.columns if not c.startswith("tag_")]
    sample_rows = [(table.keys[i], {c: table.rows[i].get(c, "") for c in info_columns}) for i in sampled]
    sheet_path, state_path = out_dir / "tags.csv", out_dir / "tags_state.json"
    columns, rows, categories, manual_edits, state = merge_tag_sheet(
        sheet_path, state_path, sample_rows, info_columns, auto
    )
    n = len(rows)
    stats = []
    for category, source in categories.items():
        count = sum(is_marked(r[category]) for r in rows)
        fraction = count / n if n else 0.0
        entry = {
            "category": category,
            "source": source,
            "count": count,
            "pct": 100 * fraction,
            "best_error_pct": 100 * ceiling(rate, fraction),
            "relative_pct": 100 * fraction,
        }
        if category in auto_all:
            entry["dev_set_pct"] = 100 * float(auto_all[category].mean())
        stats.append(entry)
    stats.sort(key=lambda e: -e["count"])
    analysis = {
        "errors_csv": str(errors_path),
        "rule": rule_text,
        "n_dev": len(table),
        "n_errors": int(failing.sum()),
        "error_rate": rates,
        "n_eyeball": int(eyeball.sum()),
        "n_blackbox": int(blackbox.sum()),
        "n_eyeball_errors": int((eyeball & failing).sum()),
        "n_sampled": n,
        "sampled_keys": keys,
        "seed": s["seed"],
        "manual_edits": manual_edits,
        "parked_rows": len(state["parked"]),
        "categories": stats,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles, sheet_note = contact_sheet(table, sampled, out_dir / "contact_sheet.png", s, search_dirs)
    analysis["contact_sheet"] = {"tiles": tiles, "note": sheet_note}
    write_json(state_path, state)
    write_text(sheet_path, _csv_text(columns, rows))
    write_json(out_dir / "analysis.json", analysis)
    write_text(out_dir / "report.md", render_report(analysis, checklist))
    if run is not None:
        names = ["category", "source", "count", "pct", "best_error_pct", "relative_pct"]
        run.log_table("error_analysis/categories", [[e[k] for k in names] for e in stats], names)
        run.log({"error_analysis/error_rate": rate, "error_analysis/n_sampled": n})
        if tiles:
            from PIL import Image

            run.log_image(
                "error_analysis/contact_sheet", np.asarray(Image.open(out_dir / "contact_sheet.png"))
            )
    return analysis


def _merge_settings(settings):
    merged = group_defaults("debugging/error_analysis/default") | {"seed": 0}
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def render_report(a, checklist=None):
    rate = a["error_rate"]
    lines = [
        "# Error analysis",
        "",
        f"Errors: {a['rule']}. Source: `{a['errors_csv']}`.",
        "",
        "| subset | samples | error rate |",
        "|---|---|---|",
        f"| dev set (all) | {a['n_dev']} | {_pct(rate['dev'])} |",
        f"| eyeball (inspected) | {a['n_eyeball']} | {_pct(rate['eyeball'])} |",
        f"| blackbox (not inspected) | {a['n_blackbox']} | {_pct(rate['blackbox'])} |",
        "",
        "If the eyeball error rate falls much faster than the blackbox one over several rounds, your fixes "
        "are tuned to what you looked at: draw a new eyeball subset (change `seed`).",
        "",
        f"Sampled {a['n_sampled']} of the {a['n_eyeball_errors']} eyeball errors (seed {a['seed']}); "
        f"the tag sheet is `tags.csv` ({a['manual_edits']} manual marks differ from the automatic tags"
        + (
            f"; {a['parked_rows']} earlier rows with your marks are no longer sampled errors: kept in "
            "tags_state.json, they return if sampled again)."
            if a["parked_rows"]
            else ")."
        ),
        "",
        "| category | source | count | % of total | dev set % | fixing all of these takes error from → at best | relative |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in a["categories"]:
        dev = f"{e['dev_set_pct']:.1f}%" if "dev_set_pct" in e else "—"
        lines.append(
            f"| {e['category']} | {e['source']} | {e['count']} | {e['pct']:.1f}% | {dev} | "
            f"{100 * rate['dev']:.1f}% → {e['best_error_pct']:.2f}% | {e['relative_pct']:.1f}% |"
        )
    if not a["categories"]:
        lines.append("| (no categories yet: add columns to tags.csv) | | | | | | |")
    lines.append("")
    for e in a["categories"]:
        if e["count"]:
            lines.append(
                f"- **{e['category']}**: fixing all of these takes error from {100 * rate['dev']:.1f}% to at best "
                f"{e['best_error_pct']:.2f}%: {e['relative_pct']:.1f}% relative."
            )
    lines += [
        "",
        "Ceiling: with error rate X and a category covering a fraction f of the sampled errors, fixing all "
        "of them gives at best X·(1 − f). Categories overlap, so the percentages need not sum to 100. "
        "'dev set %' is the category's share of the whole dev set (automatic tags only): a category much "
        "more common among errors than in the dev set is where the model struggles.",
        "",
        f"Contact sheet: {a['contact_sheet']['note']}.",
        "",
        "Edit `tags.csv` (mark cells, add a column per new category, comment) and re-run `make analyze`: your "
        "edits are kept and override the automatic tags. Then pick the fix with the largest ceiling.",
    ]
    if checklist:
        lines += ["", "Serves these items of `4_debugging/CHECKLIST.md`:", ""] + [
            f"- {item}" for item in checklist
        ]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    settings = OmegaConf.to_container(cfg.debugging.error_analysis, resolve=True)
    errors_path, out_dir = Path(settings.pop("errors")), Path(settings.pop("out"))
    run = start_run(cfg, "error_analysis")
    try:
        analysis = analyze(
            errors_path,
            out_dir,
            requirements_path=cfg.paths.requirements,
            settings=settings,
            search_dirs=[cfg.paths.root, errors_path.parent],
            checklist=checklist_items(Path(cfg.paths.debugging) / "CHECKLIST.md", "error analysis"),
            run=run,
            task=configured_task(cfg),
        )
    except (ErrorAnalysisError, RequirementsError, yaml.YAMLError) as err:
        print(f"analyze: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        run.finish()
    top = analysis["categories"][:3]
    print(f"error rate {_pct(analysis['error_rate']['dev'])}; sampled {analysis['n_sampled']} errors")
    for e in top:
        print(f"  {e['category']}: {e['pct']:.0f}% of errors -> at best {e['best_error_pct']:.2f}% error")
    print(f"report: {out_dir / 'report.md'}")


if __name__ == "__main__":
    main()
