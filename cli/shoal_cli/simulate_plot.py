"""The PNG that ``shoal simulate --out`` writes: a simulation's arrivals, queue lag and
replicas in three stacked charts. Drawing is the CLI's business (matplotlib is the
``shoal-cli[simulate]`` extra), so the engines in :mod:`shoal_core.autoscale` stay pure;
matplotlib is imported only when a plot is asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from shoal_core.autoscale.simulate import Step


def plot(steps: Sequence[Step], start: datetime, path: Path, title: str = "") -> None:
    """Three stacked charts in a PNG: arrivals/s, queue lag, and replicas with the HPA's
    bounds. Needs matplotlib (``pip install 'shoal-cli[simulate]'``); ImportError without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'shoal-cli[simulate]'") from exc

    # Hours from the start, not datetimes: 86,400 points plot much faster as floats.
    times = [s.t / 3600 for s in steps]
    fig, (ax_in, ax_lag, ax_rep) = plt.subplots(3, 1, sharex=True, figsize=(11, 7.5))
    try:
        ax_in.plot(times, [s.arrivals for s in steps], linewidth=0.7, color="tab:blue")
        if any(s.forecast_rate is not None for s in steps):
            ax_in.plot(
                times,
                [math.nan if s.forecast_rate is None else s.forecast_rate for s in steps],
                linewidth=0.9,
                color="tab:purple",
                label="forecast (horizon ahead)",
            )
            ax_in.legend(loc="upper right", fontsize="small")
        ax_in.set_ylabel("arrivals / s")
        ax_lag.plot(times, [s.lag for s in steps], linewidth=0.7, color="tab:red")
        ax_lag.set_ylabel("queue lag")
        ax_rep.step(times, [s.replicas for s in steps], where="post", label="replicas")
        ax_rep.step(times, [s.ready for s in steps], where="post", linewidth=0.7, label="ready")
        ax_rep.step(
            times,
            [s.hpa_min for s in steps],
            where="post",
            linestyle="--",
            linewidth=0.8,
            label="HPA min",
        )
        ax_rep.step(
            times,
            [s.hpa_max for s in steps],
            where="post",
            linestyle=":",
            linewidth=0.8,
            label="HPA max",
        )
        ax_rep.set_ylabel("replicas")
        ax_rep.legend(loc="upper right", fontsize="small", ncol=4)
        ax_rep.set_xlabel(f"hours from {start:%a %Y-%m-%d %H:%M} {start.tzname() or ''}")
        for ax in (ax_in, ax_lag, ax_rep):
            ax.grid(True, linewidth=0.3)
            ax.set_ylim(bottom=0)
        if title:
            ax_in.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
