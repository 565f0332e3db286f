"""Picture of generated training samples, one row per source (docs/img/synthetic_samples.png).

    python benchmarks/synthetic_samples.py [-o docs/img/synthetic_samples.png] [--data DIR] [--prepared DIR]

Each panel: the axial slice through the target's centre of a 128³ sample as `train --data-mix` draws it
(z-normalised image, window −2…3), with the target's outline in red. Rows: shapes, synth-labels and
supervoxels (from the nnU-Net datasets under --data), real (the prepared pairs of --prepared, if given).
Seeds are fixed, so the picture is reproducible.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastsam3d_cli.data.mixing import build_source  # noqa: E402
from fastsam3d_cli.data.synthetic import generator_for  # noqa: E402

LABEL_MAP_DATASETS = ("Dataset501_AbdomenCT", "Dataset502_AbdomenMR", "Task503_Colin27")
COLUMNS = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/img/synthetic_samples.png"))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("FASTSAM3D_DATA_DIR", "/work/shared/data")))
    parser.add_argument("--prepared", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args()
    roots = [args.data / name for name in LABEL_MAP_DATASETS if (args.data / name).is_dir()]
    rows: list[tuple[str, object]] = [("shapes", build_source("shapes"))]
    if roots:
        rows += [(name, build_source(name, label_maps=roots)) for name in ("synth-labels", "supervoxels")]
    if args.prepared is not None:
        from fastsam3d_cli.data.prepared import list_prepared_samples
        from fastsam3d_cli.data.training_data import InteractiveCropDataset

        real = InteractiveCropDataset(list_prepared_samples(args.prepared), seed=args.seed)
        rows.append(("real", build_source("real", real_dataset=real)))
    figure, axes = plt.subplots(len(rows), COLUMNS, figsize=(2.2 * COLUMNS, 2.35 * len(rows)), squeeze=False)
    for row, (name, source) in enumerate(rows):
        for column in range(COLUMNS):
            sample = source.sample(generator_for(args.seed, 0, column, row + 1))  # type: ignore[attr-defined]
            image, label = sample["image"][0].numpy(), sample["label"][0].numpy() > 0.5
            k = int(round(np.argwhere(label)[:, 2].mean()))
            ax = axes[row, column]
            # ijk arrays: show i across, j up (RAS: patient right to the right of the panel is i increasing)
            ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=-2, vmax=3, interpolation="nearest")
            ax.contour(label[:, :, k].T.astype(float), levels=[0.5], colors="red", linewidths=1.0, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{int(label.sum())} voxels", fontsize=7)
            if column == 0:
                ax.set_ylabel(name, fontsize=10)
    figure.suptitle("train --data-mix sources: 128³ samples at 1.5 mm, target outlined", fontsize=10)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=72)
    print(args.output)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
