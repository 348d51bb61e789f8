"""The labels contract and the training set: labels joined to candidates by stable cell id.

Labels (``data/05_model_input/labels.json``, written by ``kedro annotate`` or the simulated annotator)::

    {"version": 1, "labels": [{"cell_id": str, "label": "yes" | "no" | "unsure",
                               "annotator": str, "updated_at": ISO-8601 UTC str}, ...]}

one entry per ``(cell_id, annotator)``. A cell's type is the middle part of its id
``{tile_id}_{cell_type}_{label:05d}``. Nothing is dropped silently: malformed entries and ids that name no
candidate stop the build naming them; ``unsure`` cells and cells whose annotators disagree are left out
of training and counted (with examples) in the summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from mk_hspc.errors import UserError

LABELS_VERSION = 1
LABEL_VALUES = ("yes", "no", "unsure")
MAX_NAMED = 10  # ids quoted in a message or summary


class LabelsError(UserError, ValueError):
    """A labels file that breaks the contract or names cells that do not exist; the message names them."""


def cell_type_of(cell_id: str) -> str:
    """``cell_type`` part of ``f"{tile_id}_{cell_type}_{label:05d}"`` (cell types contain no ``_``)."""
    parts = str(cell_id).rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit() or not parts[1] or not parts[0]:
        raise ValueError(f"cell id {cell_id!r} does not follow '{{tile_id}}_{{cell_type}}_{{label:05d}}'")
    return parts[1]


def labels_table(document: Mapping[str, Any], *, source: str = "labels") -> pd.DataFrame:
    """The labels document as a table (``cell_id, cell_type, label, annotator, updated_at``), checked.

    Raises:
        LabelsError: wrong version or layout, an entry with a missing field, a label outside
            yes/no/unsure, a malformed cell id or timestamp, or two entries for one (cell, annotator);
            every offending entry is named (index and cell id).
    """
    if not isinstance(document, Mapping) or document.get("version") != LABELS_VERSION:
        raise LabelsError(f"{source}: expected a mapping with version {LABELS_VERSION} and a 'labels' list")
    entries = document.get("labels")
    if not isinstance(entries, list):
        raise LabelsError(f"{source}: 'labels' must be a list")
    problems: list[str] = []
    rows = []
    for i, entry in enumerate(entries):
        where = f"labels[{i}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: not a mapping")
            continue
        missing = [k for k in ("cell_id", "label", "annotator", "updated_at") if not entry.get(k)]
        if missing:
            problems.append(f"{where} ({entry.get('cell_id')!r}): missing {', '.join(missing)}")
            continue
        cell_id, label = str(entry["cell_id"]), entry["label"]
        if label not in LABEL_VALUES:
            problems.append(
                f"{where} ({cell_id}): invalid label {label!r}; allowed: {', '.join(LABEL_VALUES)}"
            )
            continue
        try:
            cell_type = cell_type_of(cell_id)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        try:
            updated_at = datetime.fromisoformat(str(entry["updated_at"]).replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"{where} ({cell_id}): updated_at {entry['updated_at']!r} is not ISO-8601")
            continue
        rows.append((cell_id, cell_type, label, str(entry["annotator"]), updated_at))
    table = pd.DataFrame(rows, columns=["cell_id", "cell_type", "label", "annotator", "updated_at"])
    twice = table[table.duplicated(["cell_id", "annotator"], keep=False)]
    for (cell_id, annotator), _ in twice.groupby(["cell_id", "annotator"]):
        problems.append(f"{cell_id}: more than one entry by annotator {annotator!r}")
    if problems:
        shown = problems[:MAX_NAMED] + (
            [f"... and {len(problems) - MAX_NAMED} more"] if len(problems) > MAX_NAMED else []
        )
        raise LabelsError(
            f"{source}: {len(problems)} invalid entr{'y' if len(problems) == 1 else 'ies'}:\n  "
            + "\n  ".join(shown)
        )
    return table


def resolve_labels(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One decision per cell: the label all its annotators agree on (``unsure`` votes abstain).

    Returns:
        ``(decided, excluded)``: ``decided`` has ``cell_id, cell_type, label (yes|no), n_annotators``;
        ``excluded`` maps ``"unsure"`` (only unsure votes) and ``"conflicting"`` (yes and no) to cell ids.
    """
    votes = table[table["label"] != "unsure"]
    kinds = votes.groupby("cell_id")["label"].agg(lambda s: tuple(sorted(set(s))))
    conflicting = sorted(kinds.index[kinds.map(len) > 1])
    unsure = sorted(set(table["cell_id"]) - set(votes["cell_id"]))
    agreed = kinds[kinds.map(len) == 1].map(lambda k: k[0])
    n_annotators = votes.groupby("cell_id")["annotator"].nunique()
    decided = pd.DataFrame(
        {
            "cell_id": agreed.index.astype(str),
            "cell_type": [cell_type_of(c) for c in agreed.index],
            "label": agreed.to_numpy(),
            "n_annotators": n_annotators.reindex(agreed.index).to_numpy(),
        }
    )
    return decided.sort_values("cell_id", ignore_index=True), {"unsure": unsure, "conflicting": conflicting}


def feature_columns(cells: pd.DataFrame, prefixes: Sequence[str] = ("morphology_",)) -> list[str]:
    """Numeric feature columns of the cells table with one of the given prefixes, in table order."""
    return [
        c for c in cells.columns if c.startswith(tuple(prefixes)) and pd.api.types.is_numeric_dtype(cells[c])
    ]


def build_training_set(
    labels: Mapping[str, Any],
    cells: pd.DataFrame,
    cell_type: str,
    features: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Labelled candidates of one cell type with their features: the rows a classifier learns from.

    Args:
        labels: the labels document (contract above).
        cells: the cells table (``cell_id``, ``slide``); every labelled id must be in it.
        cell_type: ``mk`` or ``hspc``: labels of other types are counted, not used.
        features: feature matrix indexed by ``cell_id`` (at least the labelled cells of this type).

    Returns:
        ``(training_set, summary)``: ``cell_id, slide, y`` (1 = yes) + feature columns; the summary counts
        labels, decisions, classes and lists (a few of) the excluded cells.

    Raises:
        LabelsError: invalid entries, or labelled ids that are not candidates of this study (named).
    """
    table = labels_table(labels)
    unknown = sorted(set(table["cell_id"]) - set(cells["cell_id"].astype(str)))
    if unknown:
        raise LabelsError(
            f"labels: {len(unknown)} cell id(s) are not candidates in the cells table (labels from another "
            f"study or segmentation run?): {', '.join(unknown[:MAX_NAMED])}"
            + (f" ... and {len(unknown) - MAX_NAMED} more" if len(unknown) > MAX_NAMED else "")
        )
    own = table[table["cell_type"] == cell_type]
    decided, excluded = resolve_labels(own)
    slides = cells.set_index(cells["cell_id"].astype(str))["slide"].astype(str)
    training = decided[["cell_id"]].assign(
        slide=slides.reindex(decided["cell_id"]).to_numpy(), y=(decided["label"] == "yes").astype("int64")
    )
    if len(training):
        missing = sorted(set(training["cell_id"]) - set(features.index.astype(str)))
        if missing:
            # Both tables are this pipeline's own outputs: a mismatch is a bug, not bad input (keeps its traceback).
            raise RuntimeError(
                f"no features for {len(missing)} labelled cell(s) of the cells table, e.g. {missing[:MAX_NAMED]}"
            )
        matrix = features.loc[training["cell_id"]].reset_index(drop=True)
        training = pd.concat([training.reset_index(drop=True), matrix], axis=1)
    summary = {
        "cell_type": cell_type,
        "n_label_entries": int(len(own)),
        "n_label_entries_other_types": int(len(table) - len(own)),
        "n_annotators": int(own["annotator"].nunique()),
        "n_cells_labelled": int(own["cell_id"].nunique()),
        "n_training": int(len(training)),
        "n_yes": int(training["y"].sum()) if len(training) else 0,
        "n_no": int((training["y"] == 0).sum()) if len(training) else 0,
        "n_unsure": len(excluded["unsure"]),
        "n_conflicting": len(excluded["conflicting"]),
        "unsure_examples": excluded["unsure"][:MAX_NAMED],
        "conflicting_examples": excluded["conflicting"][:MAX_NAMED],
        "n_slides": int(training["slide"].nunique()) if len(training) else 0,
        "n_features": int(training.shape[1] - 3) if len(training) else 0,
    }
    return training, summary
