"""Learning curves of the teachers, from the CSV logs a training run writes, as one plot and plain CSV copies.

    python -m benchmarks.curves --run runs/default --out benchmarks/results

reads ``teachers/detect/results.csv`` (Ultralytics), ``teachers/semantic/results.csv`` and
``teachers/classify/results.csv`` (the heads trained on cached body features, ``codec.train``), copies them to ``OUT/curves/`` (they are small and
outlive the run folder) and draws ``OUT/learning_curves.png``: validation box mAP50 / mAP50-95, mIoU and
station top-1 per epoch, on the training scenes' val split (the training distribution, not held-out belts).
"""
from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

SERIES = {  # file -> [(column, label)]
    "detect": [("metrics/mAP50(B)", "box mAP50"), ("metrics/mAP50-95(B)", "box mAP50-95")],
    "semantic": [("val_miou", "mIoU")],
    "classify": [("val_top1", "station top-1")],
}


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot the teachers' learning curves from a training run's logs.")
    p.add_argument("--run", default="runs/default", help="training run folder (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="where the plot and CSV copies go (default: %(default)s)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    found = 0
    for ax, (name, series) in zip(axes, SERIES.items()):
        path = Path(args.run) / "teachers" / name / "results.csv"
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if not path.is_file():
            ax.text(0.5, 0.5, "not trained yet", ha="center", transform=ax.transAxes)
            continue
        found += 1
        shutil.copyfile(path, out / "curves" / f"{name}.csv")
        rows = read_csv(path)
        for col, label in series:
            ys = [r.get(col, float("nan")) for r in rows]
            scale = 100.0 if ys and max(ys) <= 1.0 else 1.0  # Ultralytics logs fractions, the head percents
            ax.plot([r["epoch"] for r in rows], [y * scale for y in ys], marker="o", ms=3, label=label)
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right")
    fig.suptitle(f"teachers' learning curves ({args.run}; val split of the training scenes)")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    print(f"wrote {out / 'learning_curves.png'} ({found} of {len(SERIES)} curves) and {out / 'curves'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
