"""Active learning: the next annotation batch, the most uncertain unlabelled candidates spread over slides.

Uncertainty is ``1 - |2 p - 1|`` (1 at p = 0.5). Diversity: slides take turns (round robin over slides,
each slide's candidates in order of uncertainty), so one slide with many borderline cells cannot fill the
batch, and within a slide a candidate closer than ``min_distance_um`` to one already picked is skipped
(two views of the same cluster teach little).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def uncertainty(probability: np.ndarray) -> np.ndarray:
    return 1.0 - np.abs(2.0 * np.asarray(probability, float) - 1.0)


def next_batch(candidates: pd.DataFrame, batch_size: int, *, min_distance_um: float = 0.0) -> pd.DataFrame:
    """Pick ``batch_size`` candidates (``cell_id, slide, probability, centroid_x_um, centroid_y_um``).

    Returns:
        The picked rows with ``uncertainty`` and ``batch_rank`` (0 = most useful), in rank order.
    """
    pool = candidates.assign(uncertainty=uncertainty(candidates["probability"].to_numpy()))
    pool = pool.sort_values(["uncertainty", "cell_id"], ascending=[False, True])
    queues = {slide: rows for slide, rows in pool.groupby(pool["slide"].astype(str), sort=True)}
    cursors = dict.fromkeys(queues, 0)
    picked_xy: dict[str, list[tuple[float, float]]] = {slide: [] for slide in queues}
    picked: list[int] = []
    while len(picked) < batch_size and any(cursors[s] < len(queues[s]) for s in queues):
        # The slide whose best remaining candidate is most uncertain goes next: a fair, greedy turn.
        order = sorted(
            (s for s in queues if cursors[s] < len(queues[s])),
            key=lambda s: (-queues[s]["uncertainty"].iloc[cursors[s]], len(picked_xy[s]), s),
        )
        for slide in sorted(order, key=lambda s: len(picked_xy[s])):
            if len(picked) >= batch_size:
                break
            rows = queues[slide]
            while cursors[slide] < len(rows):
                row = rows.iloc[cursors[slide]]
                cursors[slide] += 1
                xy = (float(row["centroid_x_um"]), float(row["centroid_y_um"]))
                if all(np.hypot(xy[0] - x, xy[1] - y) >= min_distance_um for x, y in picked_xy[slide]):
                    picked_xy[slide].append(xy)
                    picked.append(rows.index[cursors[slide] - 1])
                    break
    batch = pool.loc[picked].reset_index(drop=True)
    batch["batch_rank"] = np.arange(len(batch), dtype=np.int64)
    return batch
