"""Labels node: the latest label per (cell, annotator) from the SQLite store, as the labels contract."""

from __future__ import annotations

from typing import Any

from mk_hspc.labels.store import LabelStore


def export_labels(label_store: LabelStore) -> dict[str, Any]:
    """The labels contract document (``docs/CONTRACTS.md``) of the store's current labels."""
    try:
        return label_store.payload()
    finally:
        label_store.close()
