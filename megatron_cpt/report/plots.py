"""The report's figures as PNG files (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_cpt.report.load import CONTROL_PREFIX, GENERAL, Study

STYLE = {"specialized": ("tab:red", "-"), "general": ("tab:blue", "-"),
         "control": ("tab:gray", "--")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _runs(study: Study, size: str, domain: str) -> dict:
    out = {"specialized": study.run(size, domain), "general": study.run(size, GENERAL),
           "control": study.run(size, f"{CONTROL_PREFIX}{domain}")}
    return {k: r for k, r in out.items() if r is not None and r.points}


def _grid(plt, n: int, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(4.2 * n, 3.3 * rows), squeeze=False)
    return fig, axes


def _curve(ax, runs: dict, fn, label_suffix: str = "") -> bool:
    drawn = False
    for k, r in runs.items():
        y = fn(r)
        ok = np.isfinite(y)
        if ok.any():
            c, ls = STYLE[k]
            ax.plot(r.flops[ok], y[ok], ls, color=c, marker="o", ms=3, label=k + label_suffix)
            drawn = True
    return drawn


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


FORMATS = (("_cf", "CF"), ("", "MCF"))  # exam key suffix, label (eval/tasks.py)


def score_vs_compute(study: Study, size: str, out: Path) -> Path | None:
    """Val (solid/dashed) and test (dotted) accuracy vs FLOPs per domain (columns), one row
    per exam format (CF: the answer text; MCF: the letter)."""
    plt = _plt()

    def scored(e, d):
        return any(np.isfinite(r.exam(e, "val")).any() for r in _runs(study, size, d).values())

    doms = [d for d in study.domains if any(scored(d + x, d) for x, _ in FORMATS)]
    forms = [(x, n) for x, n in FORMATS if any(scored(d + x, d) for d in doms)]
    if not doms:
        return None
    fig, axes = _grid(plt, len(doms), len(forms))
    for row, (suffix, label) in enumerate(forms):
        for ax, d in zip(axes[row], doms):
            runs, e = _runs(study, size, d), d + suffix
            _curve(ax, runs, lambda r, e=e: r.exam(e, "val"), " (val)")
            for k, r in runs.items():
                y = r.exam(e, "test")
                if np.isfinite(y).any():
                    ax.plot(r.flops, y, ":", color=STYLE[k][0], alpha=0.6, label=f"{k} (test)")
            # the whole [0, 1] range: a one-question wobble must not look like an effect
            ax.set(title=f"{size}: {d} exam, {label}", xlabel="FLOPs", ylim=(0.0, 1.0),
                   ylabel="accuracy" + (" (per-char norm.)" if suffix else ""))
            _legend(ax)
    return _save(fig, out / f"score_vs_compute_{size}.png")


def sger_vs_size(study: Study, cells: dict, out: Path) -> Path | None:
    """SGER per domain vs parameters (log axes): on the exam with bootstrap CI error bars
    (solid), on the domain validation loss as a point estimate (dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    drawn = False
    for i, d in enumerate(study.domains):
        color = f"C{i}"
        for key, style, label in (("sger", "-", f"{d} (exam)"),
                                  ("sger_domain_loss", "--", f"{d} (domain loss)")):
            xs, ys, lo, hi = [], [], [], []
            for s, n in study.sizes.items():
                c = cells.get(f"{s}/{d}")
                v = (c or {}).get(key) or {}
                if n and v.get("value"):
                    ci = (((c.get("bootstrap") or {}).get(key) or {}).get("ci")) or [v["value"]] * 2
                    xs.append(n), ys.append(v["value"])
                    lo.append(max(v["value"] - ci[0], 0)), hi.append(max(ci[1] - v["value"], 0))
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ls=style, color=color, capsize=3,
                            label=label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="parameters", ylabel="SGER (general / specialized compute)",
           title="SGER vs model size (exam: 95% bootstrap CI)")
    _legend(ax)
    return _save(fig, out / "sger_vs_size.png")


def forgetting(study: Study, size: str, out: Path) -> Path | None:
    """General validation loss (top) and general exam test accuracy (bottom) vs FLOPs."""
    plt = _plt()
    doms = [d for d in study.domains if study.run(size, d) is not None
            and study.run(size, d).points]
    if not doms:
        return None
    fig, axes = _grid(plt, len(doms), 2)
    drawn = False
    for j, d in enumerate(doms):
        runs = _runs(study, size, d)
        drawn |= _curve(axes[0][j], runs, lambda r: r.valid(GENERAL))
        drawn |= _curve(axes[1][j], runs, lambda r: r.exam(GENERAL, "test"))
        axes[0][j].set(title=f"{size}: {d} vs general", ylabel="general valid loss")
        axes[1][j].set(xlabel="FLOPs", ylabel="general exam test acc", ylim=(0.0, 1.0))
        _legend(axes[0][j])
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out / f"forgetting_{size}.png")


def domain_loss(study: Study, size: str, out: Path) -> Path | None:
    """Domain validation loss vs FLOPs: specialized vs general vs control."""
    plt = _plt()
    doms = [d for d in study.domains
            if any(np.isfinite(r.valid(d)).any() for r in _runs(study, size, d).values())]
    if not doms:
        return None
    fig, axes = _grid(plt, len(doms))
    drawn = False
    for ax, d in zip(axes[0], doms):
        drawn |= _curve(ax, _runs(study, size, d), lambda r, d=d: r.valid(d))
        ax.set(title=f"{size}: {d} validation loss", xlabel="FLOPs", ylabel="loss")
        _legend(ax)
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out / f"domain_loss_{size}.png")


def all_plots(study: Study, cells: dict, out: Path) -> list[Path]:
    paths = [sger_vs_size(study, cells, out)]
    for size in study.sizes:
        paths += [score_vs_compute(study, size, out), domain_loss(study, size, out),
                  forgetting(study, size, out)]
    return [p for p in paths if p is not None]
