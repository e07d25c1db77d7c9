"""PNG figures: the shared drawing helpers, and the `rayq analyze` figures of a checkpoint.

Every figure says where its numbers come from: `stamp` writes the checkpoint (or search), the
step and the quantization schemes under the plot, so a PNG that travels alone is still read
right. Matplotlib is used through `Figure` objects and the Agg canvas only (no pyplot), so
drawing changes no global backend state and is safe off the main thread; every PNG is written
atomically (readers never see half a file).

The analyze figures follow the paper's Figs 4, 5, 10 and 11 (LayerNorm gain spread, INT8 error
and activation scale per layer, spectral norms, weight distributions and the outlier picture).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rayq.config import atomic_write_bytes

__all__ = ["figure", "save_png", "stamp", "place_labels", "plot_diagnostics", "DIAGNOSTIC_PLOTS"]

DIAGNOSTIC_PLOTS = ("ln_gain.png", "activations.png", "spectral_norm.png", "weights_outliers.png")
# what the RMSE panel measures: the activation side of the paper's W8A8 vector-wise scheme
RMSE_SCHEME = "INT8 vector-wise (per-token absmax) quantize-dequantize"


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer for measuring labels (place_labels) before saving
    return fig


def stamp(fig: Any, text: str) -> None:
    """The figure's provenance line (search or checkpoint, step, schemes), under the plots."""
    fig.supxlabel(text, fontsize=7, color="0.35")


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> str:
    """savefig into memory, then an atomic write; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


_OFFSETS = [(6, 5), (6, -12), (-6, 5), (-6, -12), (10, 14), (10, -20), (-10, 14), (-10, -20), (0, 22), (0, -28)]


def place_labels(ax: Any, points: Sequence[tuple[float, float]], texts: Sequence[str], **kw: Any) -> list:
    """Annotate points so that no two labels overlap: each label takes the first of a few
    offsets around its point whose box is clear of the labels placed before it (a label with
    no clear spot keeps the last offset tried)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed: list = []
    out = []
    for (x, y), text in zip(points, texts):
        ann = None
        for dx, dy in _OFFSETS:
            if ann is not None:
                ann.remove()
            ha = "left" if dx >= 0 else "right"
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=7, **kw)
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in placed):
                break
        placed.append(ann.get_window_extent(renderer))
        out.append(ann)
    return out


def plot_diagnostics(diag: Any, out_dir: str | Path, *, source: str) -> list[str]:
    """The four analyze figures of a `Diagnostics`; `source` names the checkpoint and step
    (stamped on every figure). Returns the written paths, in `DIAGNOSTIC_PLOTS` order."""
    out = Path(out_dir)
    written = []
    layers = list(range(diag.n_layer))
    where = f"{source} · {diag.tokens} held-out tokens"

    # Fig 4-like: LayerNorm gain spread per layer, and the gain distributions
    fig = figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for kind in ("ln_attn", "ln_mlp"):
        ys = [diag.ln_gain_std.get(f"blocks.{i}.{kind}", float("nan")) for i in layers]
        ax1.plot(layers, ys, marker="o", label=kind)
    ax1.set(xlabel="layer", ylabel="std of LayerNorm gain (unitless)", title="LayerNorm gain spread per layer",
            xticks=layers)
    ax1.legend(fontsize=7)
    for name, h in diag.ln_gain_hist.items():
        edges = np.asarray(h["edges"])
        ax2.step(edges[:-1], h["counts"], where="post", label=name, alpha=0.7)
    ax2.set(xlabel="LayerNorm gain value", ylabel="count of gain entries", title="LayerNorm gain histograms")
    ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    stamp(fig, where)
    written.append(save_png(fig, out / DIAGNOSTIC_PLOTS[0]))

    # Fig 5-like: quantization error and activation scale per layer
    fig = figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(layers, diag.qkv_input_rmse, marker="o")
    ax1.set(xlabel="layer", ylabel="RMSE(X, X_hat) (activation units)",
            title="INT8 error at the attn.qkv input", xticks=layers)
    for site, ys in diag.act_std.items():
        ax2.plot(layers, ys, marker="o", label=site)
    ax2.set(xlabel="layer", ylabel="mean per-token std (activation units)",
            title="activation std at each linear's input", xticks=layers)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    stamp(fig, f"{where} · X_hat: {RMSE_SCHEME}")
    written.append(save_png(fig, out / DIAGNOSTIC_PLOTS[1]))

    # Fig 10-like: spectral norms of the linear weights per layer
    fig = figure(6.5, 4)
    ax = fig.subplots()
    sites = sorted({k.split(".", 2)[2] for k in diag.spectral_norm if k.startswith("blocks.")})
    for site in sites:
        ys = [diag.spectral_norm.get(f"blocks.{i}.{site}", float("nan")) for i in layers]
        ax.plot(layers, ys, marker="o", label=site)
    ax.set(xlabel="layer", ylabel="largest singular value (unitless)", title="spectral norm of linear weights",
           xticks=layers)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    stamp(fig, where)
    written.append(save_png(fig, out / DIAGNOSTIC_PLOTS[2]))

    # Fig 11-like: weight distributions per layer, and the per-feature magnitude picture
    fig = figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for name, h in diag.weight_hist.items():
        edges = np.asarray(h["edges"])
        ax1.step(edges[:-1], np.maximum(h["counts"], 1), where="post", label=name, alpha=0.7)
    ax1.set(xlabel="weight value", ylabel="count (log scale)", yscale="log", title="block linear weights")
    ax1.legend(fontsize=6)
    mags = np.asarray(diag.dim_max_abs)
    im = ax2.imshow(mags, aspect="auto", interpolation="nearest", cmap="viridis")
    ax2.set(xlabel="feature dimension", ylabel="layer", yticks=layers,
            title=f"max |x| at attn.qkv input ({len(diag.outliers.dims)} outlier dims)")
    fig.colorbar(im, ax=ax2, label="max |x| over tokens")
    stamp(fig, f"{where} · outliers: |x| >= {diag.outliers.threshold:g} (Dettmers rule)")
    written.append(save_png(fig, out / DIAGNOSTIC_PLOTS[3]))
    return written
