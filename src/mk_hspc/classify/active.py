"""Active learning: the next annotation batch, the most useful unlabelled candidates spread over slides.

Two kinds of pick fill a batch:

* **seek** (while a class has fewer labels than the ``min_labels_per_class`` gate asks for): the candidates
  most likely to be of the lacking class (highest ``P(yes)`` for missing *yes* labels, lowest for missing
  *no*), as many slots as labels are missing (shared in proportion when both classes lack). MKs are a few
  percent of their candidates: a random pick needs hundreds of clicks before 20 of them are MKs, a model
  trained on the first labels finds them in a few batches.
* **uncertain**: the rest, most uncertain first; uncertainty is the margin ``1 - |2 p - 1|`` (1 at p = 0.5).

Diversity: slides take turns (round robin over slides, each slide's candidates in the order of the pick),
so one slide with many borderline cells cannot fill the batch, and within a slide a candidate closer than
``min_distance_um`` to one already picked is skipped (two views of the same cluster teach little).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

SEEK_YES, SEEK_NO, UNCERTAIN = "seek_yes", "seek_no", "uncertain"


def uncertainty(probability: np.ndarray) -> np.ndarray:
    return 1.0 - np.abs(2.0 * np.asarray(probability, float) - 1.0)


def label_deficit(n_yes: int, n_no: int, min_labels_per_class: int) -> dict[str, int]:
    """Labels still missing per class before the ``min_labels_per_class`` gate can pass."""
    return {"yes": max(0, min_labels_per_class - n_yes), "no": max(0, min_labels_per_class - n_no)}


def seek_slots(batch_size: int, deficit: Mapping[str, int] | None) -> dict[str, int]:
    """Slots of a batch given to seeking each lacking class: the deficit, shared pro rata when it exceeds the batch."""
    need = {k: int((deficit or {}).get(k, 0)) for k in ("yes", "no")}
    total = need["yes"] + need["no"]
    if total <= batch_size:
        return need
    yes = int(round(batch_size * need["yes"] / total))
    if need["yes"] and need["no"]:  # both lacking: both get at least one slot
        yes = min(max(yes, 1), batch_size - 1)
    return {"yes": yes, "no": batch_size - yes}


def next_batch(
    candidates: pd.DataFrame,
    batch_size: int,
    *,
    min_distance_um: float = 0.0,
    deficit: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Pick ``batch_size`` candidates (``cell_id, slide, probability, centroid_x_um, centroid_y_um``).

    Args:
        deficit: ``{"yes": n, "no": m}`` labels still missing per class (:func:`label_deficit`); None or
            zeros: uncertainty only.

    Returns:
        The picked rows with ``uncertainty``, ``pick`` (``seek_yes``, ``seek_no`` or ``uncertain``) and
        ``batch_rank`` (0 = most useful), in rank order.
    """
    pool = candidates.assign(uncertainty=uncertainty(candidates["probability"].to_numpy()))
    slots = seek_slots(batch_size, deficit)
    passes = [
        (SEEK_YES, slots["yes"], pool["probability"].to_numpy(float)),
        (SEEK_NO, slots["no"], -pool["probability"].to_numpy(float)),
    ]
    picked: list[int] = []
    kinds: list[str] = []
    picked_xy: dict[str, list[tuple[float, float]]] = {}
    for kind, n_slots, key in passes:
        chosen = _round_robin(pool, key, n_slots, picked, picked_xy, min_distance_um)
        picked += chosen
        kinds += [kind] * len(chosen)
    chosen = _round_robin(
        pool, pool["uncertainty"].to_numpy(), batch_size - len(picked), picked, picked_xy, min_distance_um
    )
    picked += chosen
    kinds += [UNCERTAIN] * len(chosen)
    batch = pool.loc[picked].reset_index(drop=True)
    batch["pick"] = kinds
    batch["batch_rank"] = np.arange(len(batch), dtype=np.int64)
    return batch


def _round_robin(
    pool: pd.DataFrame,
    key: np.ndarray,
    n: int,
    taken: list[int],
    picked_xy: dict[str, list[tuple[float, float]]],
    min_distance_um: float,
) -> list[int]:
    """Up to ``n`` rows of ``pool`` not in ``taken``, highest ``key`` first, slides taking turns."""
    if n <= 0:
        return []
    ranked = pool.assign(_key=key).drop(index=taken)
    ranked = ranked.sort_values(["_key", "cell_id"], ascending=[False, True])
    queues = {slide: rows for slide, rows in ranked.groupby(ranked["slide"].astype(str), sort=True)}
    cursors = dict.fromkeys(queues, 0)
    for slide in queues:
        picked_xy.setdefault(slide, [])
    chosen: list[int] = []
    while len(chosen) < n and any(cursors[s] < len(queues[s]) for s in queues):
        # One turn: slides with fewer picks first, then the slide whose best remaining candidate ranks highest.
        order = sorted(
            (s for s in queues if cursors[s] < len(queues[s])),
            key=lambda s: (len(picked_xy[s]), -queues[s]["_key"].iloc[cursors[s]], s),
        )
        for slide in order:
            if len(chosen) >= n:
                break
            rows = queues[slide]
            while cursors[slide] < len(rows):
                row = rows.iloc[cursors[slide]]
                cursors[slide] += 1
                xy = (float(row["centroid_x_um"]), float(row["centroid_y_um"]))
                if all(np.hypot(xy[0] - x, xy[1] - y) >= min_distance_um for x, y in picked_xy[slide]):
                    picked_xy[slide].append(xy)
                    chosen.append(rows.index[cursors[slide] - 1])
                    break
    return chosen
