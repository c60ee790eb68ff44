"""The doctor's report: report.md (top cause, symptoms, ranked causes, runs), report.json and the plots."""

import math

import numpy as np
import torch


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def plot(lab, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in lab.runs.items():
        steps = np.asarray(run.step_losses, dtype=float)
        if len(steps):
            k = max(1, len(steps) // 50)
            smooth = np.convolve(steps, np.ones(k) / k, mode="valid")
            ax1.plot(smooth, label=name, lw=2 if name == "configured" else 1)
        if run.val_curve:
            ax2.plot(
                range(1, len(run.val_curve) + 1),
                run.val_curve,
                marker="o",
                label=name,
                lw=2 if name == "configured" else 1,
            )
    for ax, title in ((ax1, "training loss per step (moving average)"), (ax2, "validation loss per epoch")):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step" if ax is ax1 else "epoch")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=90)
    plt.close(fig)
    files.append("curves.png")
    lr = lab.lr_range
    if lr and lr["lrs"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lr["lrs"], lr["losses"])
        ax.axvline(lr["suggestion"], color="g", ls="--", label=f"suggestion {lr['suggestion']:.2g}")
        ax.axvline(lab.task.lr, color="r", ls=":", label=f"configured {lab.task.lr:.2g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed training loss")
        ax.set_title("LR range test")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "lr_range_test.png", dpi=90)
        plt.close(fig)
        files.append("lr_range_test.png")
    if lab.overfit_curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lab.overfit_curve)
        ax.set_yscale("log")
        ax.set_title(f"overfit {lab.d.overfit_samples} samples")
        ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "overfit.png", dpi=90)
        plt.close(fig)
        files.append("overfit.png")
    return files


def markdown(name, result):
    top = result["top_cause"]
    lines = [f"# Doctor report: {name}", ""]
    present = [c for c in result["causes"] if c["present"]]
    if top == "none":
        lines += ["**No failure mode found.** Evidence:", ""]
        ln = result["symptoms"]["no_learning"]
        stuck = ln.get("terms_not_learning") or []
        lines += [
            f"- the model beats the input-independent control by {ln['gain_vs_control']:.0%} "
            f"(paired permutation test p = {ln['p_value']:.2g})"
            + (f", but not on {', '.join(stuck)} on the doctor's budget;" if stuck else ";"),
            f"- training loss never rose significantly between epochs (max rise z = "
            f"{result['symptoms']['loss_bounces']['max_rise_z']:.2f});",
            f"- no shortcut (best single input value R^2 = {result['checks']['shortcut']['best_single_value_r2']:.2f}, "
            f"best trivial model R^2 = {result['checks']['shortcut']['trivial_model_r2']:.2f}), "
            f"no train/val duplicates, data order looks random (runs test p = {result['checks']['order']['p_value']:.2g}), "
            f"validation set of {result['checks']['test_set']['n_test']} samples;",
            "- the model keeps samples apart (backprop-dependency check passed).",
        ]
        seen = [s["row"] for s in result["symptoms"].values() if s["present"]]
        if seen:
            lines.append(
                f"- the screen, on the doctor's reduced budget, looked like: {'; '.join(seen)}; no fix the doctor "
                "tried was significantly better (table below), and on a grown budget the symptom went away "
                "(report.json: checks.symptoms_on_grown_budget): a healthy run that was still young."
            )
        grown = result["checks"].get("grown_budget")
        if grown and grown["learned"]:
            lines.append(
                f"- it beat no control on the doctor's budget, but on a grown budget ({grown['epochs']} epochs, "
                f"{grown['n_train']} samples) "
                f"it beats the input-independent control by {grown['gain_vs_control']:.0%} (p = "
                f"{grown['p_value']:.2g}): the budget was too small to show learning, which is no evidence "
                "against the task."
            )
        lines.append("")
    else:
        c = present[0]
        lines += [f"**Top cause: `{top}`** - {c['summary']}", "", f"Fix: `{c['fix']}`", ""]
    lines += ["## Symptoms", "", "| symptom | talk's row | present |", "|---|---|---|"]
    for sid, s in result["symptoms"].items():
        lines.append(f"| `{sid}` | {s['row']} | {'**yes**' if s['present'] else 'no'} |")
    lines += [
        "",
        "## Causes (ranked by evidence)",
        "",
        "| rank | cause | present | evidence | fix |",
        "|---|---|---|---|---|",
    ]
    for c in result["causes"]:
        plot_ref = f" ([plot]({c['plot']}))" if c.get("plot") else ""
        lines.append(
            f"| {c['rank'] or '-'} | `{c['id']}` | {'**yes**' if c['present'] else 'no'} | "
            f"{c['summary']}{plot_ref} | `{c['fix']}` |"
        )
    lines += [
        "",
        "## Runs (doctor's reduced budget)",
        "",
        "| run | val loss | diverged | seconds |",
        "|---|---|---|---|",
    ]
    for k, r in result["runs"].items():
        lines.append(f"| {k} | {r['val_loss']:.4g} | {r['diverged']} | {r['seconds']} |")
    lines += ["", "![curves](curves.png)", ""]
    if "lr_range_test.png" in result.get("plots", []):
        lines += ["![LR range test](lr_range_test.png)", ""]
    lines += [
        f"Doctor wall time: {result['seconds']} s. Causes and thresholds: 4_debugging/FAILURE_MODES.md.",
        "",
    ]
    return "\n".join(lines)
