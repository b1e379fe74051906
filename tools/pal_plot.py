"""python -m tools.pal_plot RUN_DIR [--output PNG]: PAL's progressive factor alpha over training.

Left: alpha per epoch (mean over the epoch's PAL samples, band = +-1 std); right: the histogram
of the per-sample alpha of the last epoch (the paper's Figure 2 a/b). Reads RUN_DIR/pal_alpha.json,
which the trainer rewrites at every epoch end (method mixpro), so no rerun is needed; works on a
run that is still going. Writes RUN_DIR/pal_alpha.png unless --output is given.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from train.summary import PAL_FILE

__all__ = ["load_pal_history", "plot", "main"]



def load_pal_history(run_dir: str | Path) -> dict[str, Any]:
    """The parsed pal_alpha.json of a run folder (or the file itself), checked."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / PAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: it is written by runs with "
                                "mix.method mixpro, at each epoch end")
    try:
        data = json.loads(path.read_text())
        bins, epochs = int(data["bins"]), list(data["epochs"])
        for e in epochs:
            if len(e["counts"]) != bins:
                raise ValueError(f"epoch {e['epoch']} has {len(e['counts'])} counts, "
                                 f"expected {bins}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a PAL history file: {e}") from None
    if not epochs:
        raise ValueError(f"{path} holds no finished epoch yet")
    return data


def plot(data: dict[str, Any], out: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - MaxNLocator

    epochs = data["epochs"]
    x = [e["epoch"] + 1 for e in epochs]
    nan = float("nan")
    mean = [nan if e["alpha_mean"] is None else e["alpha_mean"] for e in epochs]
    std = [nan if e["alpha_std"] is None else e["alpha_std"] for e in epochs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(x, mean, marker="o", label="mean")
    ax1.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                     alpha=0.25, label="+-1 std")
    ax1.set(xlabel="epoch", ylabel="alpha", title="(a) progressive factor alpha per epoch",
            ylim=(0, 1))
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.grid(alpha=0.3)
    ax1.legend()
    last = epochs[-1]
    bins = data["bins"]
    lo, hi = data.get("range", [0.0, 1.0])
    width = (hi - lo) / bins
    counts = last["counts"]
    total = sum(counts)
    ax2.bar([lo + i * width for i in range(bins)], [c / total if total else 0 for c in counts],
            width=width, align="edge", edgecolor="black", linewidth=0.3)
    ax2.set(xlabel="alpha", ylabel="share of PAL samples", xlim=(lo, hi),
            title=f"(b) alpha histogram, epoch {last['epoch'] + 1} ({int(total)} samples)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.pal_plot",
                                description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run folder (holding pal_alpha.json) or the file itself")
    p.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/pal_alpha.png)")
    args = p.parse_args(argv)
    try:
        data = load_pal_history(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m tools.pal_plot: error: {e}", file=sys.stderr)
        return 2
    rd = Path(args.run_dir)
    out = Path(args.output) if args.output else (rd if rd.is_dir() else rd.parent) / "pal_alpha.png"
    plot(data, out)
    last = data["epochs"][-1]
    m = last["alpha_mean"]
    print(f"wrote {out}: {len(data['epochs'])} epochs, last epoch alpha mean "
          f"{'nan' if m is None or (isinstance(m, float) and math.isnan(m)) else f'{m:.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
