"""Stage 4: the failure-mode doctor. Symptom -> cause -> evidence -> fix, for one experiment config.

    python -m <package>.debugging.doctor experiment=<name>               # make doctor EXPERIMENT=<name>
    python -m <package>.debugging.doctor training.lr=3                    # make doctor OVERRIDES="training.lr=3"

It builds the experiment exactly as training does (`training.build`, injected faults included) on a reduced
budget (configs/debugging/doctor/default.yaml: small images, a few hundred samples, short runs), trains
through the project's own training step (`training.run_epoch`, the code `make train` runs), and reads top to
bottom (`diagnose`):

1. `screen.screen`: a short training run with loss curves, compared with Karpathy's input-independent control
   (same run, inputs zeroed), plus cheap data and model checks that run every time -> the symptoms;
2. `causes.integrity`: the checks that invalidate every comparison of runs (a leak, a batch-mixing model);
3. `engine.run` over the rows of `fixes.TABLE` the symptoms call for: "apply the talk's fix and measure whether
   it helps" with a paired permutation test;
4. `causes.residual`: for a model that learns nothing and no fix that helped, the overfit test (of the loss
   and of each part of the output), then `unsolvable` (only if a grown budget, twice the steps on four times
   the samples, does not learn either, and fits its own training items no worse than unseen ones);
5. `causes.unexplained`: a symptom that no cause explains and that the grown budget does not do away with is
   reported as `unexplained_<symptom>`, with what to look at next (never as health); first, a grown-budget
   model that fits its own training items worse than the unseen validation items is an `implementation_bug`
   in the training pipeline, and so is a part of the output that one half of the stored training set alone
   teaches while all of it does not (the other half's labels disagree);
6. rank the causes by evidence and write 4_debugging/doctor/<experiment>/report.md, report.json and plots
   (`report.py`).

Causes (the fixed vocabulary of report.json's `top_cause`) and the talk's table are in
4_debugging/FAILURE_MODES.md, with the reason for every threshold.
"""

import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from .. import tracking
from ..files import atomic_dir, write_json, write_text
from ..paths import CONFIG_DIR
from . import causes, engine, fixes, report, screen
from .lab import Lab, TaskAdapter, budget_config

SYMPTOMS = screen.SYMPTOMS  # report.json's symptom ids: the rows of the talk's table
CAUSES = (
    "architecture",
    "not_started",
    "poor_init",
    "unsolvable",
    "poor_input_features",
    "implementation_bug",
    "lr_too_high",
    "batch_too_small",
    "data_not_shuffled",
    "answer_in_input",
    "test_set_too_small",
    "lr_too_low",
    "poor_optimizer",
    "too_much_regularization",
)
# a symptom the screen showed that no cause explains and a grown budget did not do away with
UNEXPLAINED = tuple(f"unexplained_{s}" for s in SYMPTOMS)
# Integrity checks first: a leak or a batch-mixing bug invalidates every comparison of training runs below
# them. Then the causes a statistic measures directly (data order, test-set size, input scale), then the causes
# whose fix was measured, by effect size. `unsolvable` is what is left when nothing the doctor tried makes the
# model beat the controls; an `unexplained_<symptom>` is only ever present when no cause is.
TIER = {
    "implementation_bug": 0,
    "answer_in_input": 0,
    "data_not_shuffled": 1,
    "test_set_too_small": 1,
    "poor_input_features": 1,
    "unsolvable": 3,
    **dict.fromkeys(UNEXPLAINED, 4),
}


def merge(found, more):
    """`found` with the findings in `more`; a cause found present keeps its evidence when a later check of
    the same cause finds nothing (the wider network of the fix table does not help a bottleneck that the
    output span measured)."""
    return found | {k: f for k, f in more.items() if f["present"] or not found.get(k, {}).get("present")}


def diagnose(lab):
    """Screen -> integrity -> the fix table -> residual -> ranked causes. Returns report.json's body."""
    start = time.perf_counter()
    scr = screen.screen(lab)
    checks = dict(scr.checks)
    found = causes.integrity(lab, scr) | causes.output_bottleneck(lab, scr)
    # the rows measured directly (data order), whatever the training curves look like
    ctx, _ = engine.context(lab, scr, training_fixes=False)
    found = merge(found, engine.run(ctx, engine.rows(fixes.TABLE, scr, training_fixes=False)))
    if not any(found.get(c, {}).get("present") for c in ("implementation_bug", "answer_in_input")):
        if scr.present(*engine.BAD):
            ctx, more = engine.context(lab, scr, training_fixes=True)
            checks |= more
            found = merge(found, engine.run(ctx, engine.rows(fixes.TABLE, scr, training_fixes=True), found))
        residual, more = causes.residual(lab, scr, ctx, found)
        checks |= more
        found |= residual
    unexplained, more = causes.unexplained(lab, scr, found)
    checks |= more
    found |= unexplained
    ranked = sorted(found.values(), key=lambda c: (not c["present"], TIER.get(c["id"], 2), -c["strength"]))
    for i, c in enumerate(ranked):
        c["rank"] = i + 1 if c["present"] else None
    return {
        "top_cause": ranked[0]["id"] if ranked and ranked[0]["present"] else "none",
        "causes": ranked,
        "symptoms": scr.symptoms,
        "checks": report.jsonable(checks),
        "runs": {k: r.summary() for k, r in lab.runs.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "log": lab.log,
    }


def experiment_name(cfg):
    """The report folder's name: `debugging.doctor.name`, else the experiment's (tracking.experiment_name)."""
    return str(cfg.debugging.doctor.get("name") or tracking.experiment_name(cfg))


def run_doctor(cfg, name=None):
    """Diagnose `cfg`; writes <doctor.output>/<name>/report.{md,json} + plots and returns the report dict."""
    name = name or experiment_name(cfg)
    d = cfg.debugging.doctor
    if d.get("threads"):
        torch.set_num_threads(int(d.threads))
    lab = Lab(cfg, TaskAdapter(budget_config(cfg)))
    out = Path(d.output) / name
    with atomic_dir(out) as tmp:
        result = diagnose(lab)
        result = {
            "experiment": name,
            "top_cause": result.pop("top_cause"),
            **result,
            "budget": OmegaConf.to_container(d, resolve=True),
        }
        result["plots"] = report.plot(lab, tmp)
        write_json(tmp / "report.json", report.jsonable(result))
        write_text(tmp / "report.md", report.markdown(name, result))
    run = tracking.start_run(cfg, "doctor")
    run.log(
        {"doctor/top_cause": result["top_cause"], "doctor/seconds": result["seconds"]}
        | {f"doctor/symptom/{k}": float(v["present"]) for k, v in result["symptoms"].items()}
    )
    for file in result["plots"]:
        from PIL import Image

        run.log_image(f"doctor/{Path(file).stem}", np.asarray(Image.open(out / file)))
    run.finish()
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    try:
        result = run_doctor(cfg)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    name = result["experiment"]
    top = result["top_cause"]
    fix = next((c["fix"] for c in result["causes"] if c["present"]), None)
    print(
        f"doctor: {name}: " + ("no failure mode found" if top == "none" else f"top cause {top}; fix: {fix}")
    )
    print(f"report: {Path(cfg.debugging.doctor.output) / name / 'report.md'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
