"""Training and validation curves as PNG files (matplotlib, headless Agg backend, written atomically)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from fastsam3d_cli.imaging.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _finite(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each run of `window` consecutive values (len(values) − window + 1 of them)."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]


def plot_training_curves(steps: Sequence[Mapping], epochs: Sequence[Mapping], path: Path,
                         title: str = "training") -> None:
    """Loss (top) and Dice (bottom) per optimizer step (thin line) and per epoch (dots at the epoch's last step)."""
    plt = _pyplot()
    figure, (loss_axis, dice_axis) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    for axis, key, label in ((loss_axis, "loss", "loss (Dice + CE, summed over iterations)"),
                             (dice_axis, "dice", "Dice after the last iteration")):
        if key not in (steps[0] if steps else {}) and key not in (epochs[0] if epochs else {}):
            continue
        x, y = _finite([s["step"] for s in steps], [s.get(key) for s in steps])
        if x:
            axis.plot(x, y, lw=0.6, alpha=0.3, color="tab:blue", label="per step")
            window = max(1, len(y) // 40)
            if window > 1:
                smooth = _running_mean(y, window)
                axis.plot(x[window - 1:], smooth, lw=1.4, color="tab:blue", label=f"mean of {window} steps")
        x, y = _finite([e["step"] for e in epochs], [e.get(key) for e in epochs])
        if x:
            axis.plot(x, y, "o-", color="tab:red", ms=4, label="epoch mean")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    dice_axis.set_xlabel("optimizer step")
    loss_axis.set_title(title)
    _save(figure, path)
    plt.close(figure)


def plot_dice_per_click(curves: Mapping[str, Sequence[float]], path: Path, title: str = "Dice vs clicks") -> None:
    """One line per class (thin) plus the overall mean (thick) of mean Dice after click 1..N."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    overall = curves.get("overall")
    classes = [name for name in curves if name != "overall"]
    for name in classes:
        values = list(curves[name])
        axis.plot(range(1, len(values) + 1), values, lw=1.0, alpha=0.6 if len(classes) <= 10 else 0.25,
                  label=name if len(classes) <= 10 else None)
    if overall is not None:
        axis.plot(range(1, len(overall) + 1), list(overall), "o-", lw=2.5, color="black", label="overall")
    longest = max((len(values) for values in curves.values()), default=1)
    axis.set_xticks(range(1, longest + 1, max(1, longest // 10)))
    axis.set_xlabel("number of clicks")
    axis.set_ylabel("Dice")
    axis.set_ylim(0.0, 1.0)
    axis.grid(alpha=0.3)
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=8)
    _save(figure, path)
    plt.close(figure)
