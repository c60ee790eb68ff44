"""The doctor's fix engine: one procedure for every row of the fix table (`fixes.TABLE`): when the row
applies, train its fixed variant on the doctor's budget through the project's training step, measure the
effect against the `lab.Reference` (paired permutation test on per-sample validation losses), repeat a fix
that helped on a second seed (`replicated`), and record the evidence as a finding (report.json's `causes`).
"""

import dataclasses

from omegaconf import OmegaConf

from . import probes, stats
from .lab import Reference

# what a second run's effect (a retry, a repeat on the next seed) keeps beside the first's
SECOND_RUN_KEYS = ("helped", "p_value", "gain", "val_loss_after")
ALWAYS = ()  # tried_on for a row whose cause is measured directly (tried whenever it applies)
BAD = ("no_learning", "loss_bounces", "plateau")  # a training run that is not right
NO_LEARNING = ("no_learning", "plateau")


@dataclasses.dataclass
class Context:
    """What the rows read: the lab, the screen, the reference, and the measurements shared by rows."""

    lab: object  # lab.Lab
    screen: object  # screen.Screen
    ref: Reference
    lr: dict | None = None  # the LR range test (lab.lr_range_test), when a training symptom called for it
    noise: dict | None = None  # the gradient noise scale (probes.gradient_noise_scale), idem

    @property
    def task(self):  # the configured setup on the doctor's budget
        return self.lab.task

    @property
    def cfg(self):  # the config on the doctor's budget: variants are built on it
        return self.lab.adapter.cfg

    @property
    def user(self):  # the user's config: fixes are expressed on it
        return self.lab.cfg

    @property
    def model(self):
        return self.cfg.get("model") or OmegaConf.create({})


@dataclasses.dataclass
class Variant:
    name: str  # the run's name in the report
    task: object  # the runs.Task to train
    info: dict = dataclasses.field(default_factory=dict)  # what the fix and the summary quote
    trained: object = None  # the variant's run when another check has trained it already (lab.longer)


@dataclasses.dataclass(frozen=True)
class Fix:
    cause: str  # the cause id (report.json's vocabulary)
    row: str  # the talk's symptom row (screen.SYMPTOMS)
    tried_on: tuple  # screen symptoms that call for it (ALWAYS: whenever it applies)
    applies: object  # ctx -> bool
    variant: object  # ctx -> Variant
    fix: object  # (ctx, variant) -> the override to print
    explain: object  # (ctx, variant, effect) -> (summary, evidence)
    confirm: object = None  # (ctx, variant, effect, run) -> present; default: the fix helped
    strength: object = None  # effect -> float; default: the fix's relative gain
    # a knob that speeds up any slow run (width, regularization, optimizer): its fix must also beat training
    # longer when the doctor's budget cut the configured schedule short (`against_longer`)
    beat_longer: bool = False
    # (ctx, variant) -> a second Variant to try when the first did not help, or None (`retry`)
    retry: object = None
    # tried only when no cause found so far is present: a suspect for what the table's knobs do not explain
    last_resort: bool = False


def context(lab, screen, training_fixes):
    """The rows' context. For the training fixes (a symptom of the training run is present) the reference
    gets the configured run with another seed and the chance level, and the LR range test and the gradient
    noise scale are measured; returns (context, the checks measured for it)."""
    stuck = tuple(screen.symptoms["no_learning"].get("terms_not_learning", ()))
    if not training_fixes:
        return Context(
            lab, screen, Reference(screen.base, chance=screen.chance, control=screen.control, stuck=stuck)
        ), {}
    task = lab.task
    reseeded = lab.train("configured_seed+1", task.replace(seed=task.seed + 1))
    p_seed, diff_seed = stats.paired_test(screen.base.val_losses, reseeded.val_losses)
    # the converged chance level, unless the run both learns nothing and bounces (then the bounce decides)
    chance = None if screen.present("no_learning") and screen.present("loss_bounces") else lab.chance_level()
    lr = lab.lr_range_test()
    noise = probes.gradient_noise_scale(task, model=screen.base.model if not screen.base.diverged else None)
    checks = {
        "seed_spread": {
            "val_loss": [screen.base.val_loss, reseeded.val_loss],
            "relative_difference": diff_seed,
            "p_value": p_seed,
        },
        "lr_range": lr,
        "gradient_noise": noise,
    }
    return Context(
        lab, screen, Reference(screen.base, reseeded, chance, screen.control, stuck), lr, noise
    ), checks


def rows(table, screen, training_fixes):
    """The rows of `table` to try: the ALWAYS rows, or (training_fixes) the rows one of whose symptoms is
    present."""
    if not training_fixes:
        return [r for r in table if r.tried_on == ALWAYS]
    return [r for r in table if r.tried_on != ALWAYS and screen.present(*r.tried_on)]


def run(ctx, rows, found=None):
    """The engine: for every row that applies, train its variant, measure the effect, record the evidence.
    `found`: the findings made before (a `last_resort` row is skipped when one of them is present). Returns
    {cause: finding}, a finding as in report.json's `causes`; of two rows with one cause, the later replaces
    the earlier only when it is present."""
    findings = {}
    for row in rows:
        if row.last_resort and any(f["present"] for f in [*(found or {}).values(), *findings.values()]):
            continue
        if not row.applies(ctx):
            continue
        v = row.variant(ctx)
        fixed = v.trained if v.trained is not None else ctx.lab.train(v.name, v.task)
        effect = ctx.lab.fix_effect(ctx.ref, fixed)
        if not effect["helped"] and row.retry:
            v, fixed, effect = retry(ctx, row, v, fixed, effect)
        if effect["helped"] and row.tried_on != ALWAYS:
            effect = replicated(ctx, v, effect)
        if effect["helped"] and row.beat_longer:
            effect = against_longer(ctx, effect, fixed)
        summary, evidence = row.explain(ctx, v, effect)
        present = row.confirm(ctx, v, effect, fixed) if row.confirm else effect["helped"]
        if row.cause in findings and not present:
            continue  # an earlier row's finding of this cause keeps its evidence (a later absent one adds none)
        findings[row.cause] = finding(
            row.cause,
            present,
            row.strength(effect) if row.strength else effect["gain"],
            evidence,
            row.fix(ctx, v),
            summary,
            "lr_range_test.png" if row.cause.startswith("lr_") else "curves.png",
        )
    return findings


def retry(ctx, row, v, fixed, effect):
    """The row's second variant, when it has one for this first try, trained and measured like the first.
    Returns the variant, run and effect to keep: the second's when it helped, else the first's; either way the
    other try's numbers (and its LR) are under `other_try`, so the report shows both."""
    second = row.retry(ctx, v)
    if second is None:
        return v, fixed, effect
    fixed2 = ctx.lab.train(second.name, second.task)
    effect2 = ctx.lab.fix_effect(ctx.ref, fixed2)

    def other(variant, e):
        return {
            "other_try": {"variant": variant.name, "lr": variant.task.lr} | {k: e[k] for k in SECOND_RUN_KEYS}
        }

    if effect2["helped"]:
        return second, fixed2, effect2 | other(v, effect)
    return v, fixed, effect | other(second, effect2)


def replicated(ctx, v, effect):
    """The fix trained again on the next seed must help too. The paired test behind `helped` counts the
    validation samples, not training's own randomness: a change as small as a weight decay of 1e-4 puts a
    run on another trajectory, and one such draw out of several can beat the better of two configured
    seeds by itself. `effect` with `helped` from both seeds and the second seed's numbers under `replicate`."""
    again = ctx.lab.train(f"{v.name}_seed+1", v.task.replace(seed=v.task.seed + 1))
    second = ctx.lab.fix_effect(ctx.ref, again)
    return effect | {"helped": second["helped"], "replicate": {k: second[k] for k in SECOND_RUN_KEYS}}


def against_longer(ctx, effect, fixed):
    """A wider network, no regularization or Adam speeds up any run that is slow, and the doctor's budget cuts
    the configured schedule short: a healthy run that is merely slow there gains from each of them, on both
    seeds. Such a fix says something about the config only when it also beats the same setup trained longer
    (lab.longer; paired test, the same bar as against the configured run). Not applied when the screen ran the
    whole schedule (training longer is then itself a change to the config: `not_started`), nor to a fix that
    helped by making a stuck part of the output learn."""
    if ctx.screen.symptoms["plateau"]["screen_ran_whole_schedule"] or effect.get("unstuck"):
        return effect
    task, longer = ctx.lab.longer()
    r = stats.compare_runs(longer, fixed, ctx.lab.th.alpha, ctx.lab.th.min_fix_gain, parts=False)
    versus = {"better": r["better"], "p_value": r["p_value"], "gain": r["gain"], "epochs": task.epochs}
    return effect | {"helped": r["better"], "vs_longer": versus}


def finding(cause, present, strength, evidence, fix, summary, plot=None):
    return {
        "id": cause,
        "present": bool(present),
        "strength": float(strength),
        "evidence": evidence,
        "fix": fix,
        "summary": summary,
        "plot": plot,
    }
