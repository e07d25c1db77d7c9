"""The figure of `rayq study contrast --plot FILE`: each recipe-seed's quantization damage against
training step and against its own eval loss, side by side.

The left panel is the gate's view (equal steps, equal tokens). The right panel is the view a
confounded contrast needs: a recipe that trains worse also has less to lose to quantization, so
its damage is read against how well it is trained. Every evaluation of every seed is drawn (no
averaging: with 3 seeds the spread is the finding); colour is the recipe, line style the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rayq.eval.plots import figure, save_png, stamp
from rayq.search.plots import PALETTE, metric_label
from rayq.search.study import curves

SEED_STYLES = ("-", "--", ":", "-.")


def plot_contrast(rows: Sequence[dict], metric: str, path: str | Path, *, reference: str, step: float,
                  provenance: str) -> Any:
    """Write the two-panel PNG to `path`; returns the figure."""
    kl, loss = curves(rows, metric), curves(rows, "eval/loss")
    labels = sorted({label for label, _ in kl}, key=lambda lab: (lab != reference, lab))
    seeds = sorted({s for _, s in kl})
    fig = figure(13, 6.5)
    by_step, by_loss = fig.subplots(1, 2)
    for n, label in enumerate(labels):
        colour = PALETTE[n % len(PALETTE)]
        for s in seeds:
            curve = kl.get((label, s))
            if not curve:
                continue
            style = SEED_STYLES[seeds.index(s) % len(SEED_STYLES)]
            name = f"{'reference: ' if label == reference else ''}{label}, seed {s:g}"
            steps = sorted(curve)
            by_step.plot(steps, [curve[t] for t in steps], style, color=colour, marker="o", ms=3, lw=1.2, label=name)
            matched = [t for t in steps if t in loss.get((label, s), {})]
            by_loss.plot([loss[(label, s)][t] for t in matched], [curve[t] for t in matched], style, color=colour,
                         marker="o", ms=3, lw=1.2)
            if matched:  # the last evaluation, where a run ends up
                by_loss.scatter([loss[(label, s)][matched[-1]]], [curve[matched[-1]]], color=colour, s=40, zorder=3)
    by_step.axvline(step, color="0.5", ls=":", lw=1)
    by_step.annotate(f"read at step {step:g}", (step, 1), xycoords=("data", "axes fraction"), xytext=(-4, -12),
                     textcoords="offset points", fontsize=7, color="0.35", ha="right")
    for ax in (by_step, by_loss):
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric_label(metric)} (lower is better), log scale")
        ax.grid(alpha=0.3)
    by_step.set_xlabel("training step (evaluated steps only)")
    by_loss.set_xlabel(f"{metric_label('eval/loss')} (axis reversed: training goes left to right)")
    by_loss.invert_xaxis()
    by_step.set_title(f"{metric} vs step: equal tokens", fontsize=10)
    by_loss.set_title(f"{metric} vs eval loss: equally trained (dot: last evaluation)", fontsize=10)
    # above both panels (the provenance stamp is below): every corner of the step panel holds data
    fig.legend(*by_step.get_legend_handles_labels(), fontsize=7, loc="outside upper center", ncol=2)
    stamp(fig, provenance)
    save_png(fig, path)
    return fig
