"""Plugin registry: built-ins are found through entry points; bad plugins fail clearly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mk_hspc.models import Segmentation, available_plugins, create_segmenter, registry


def test_builtin_plugins_are_registered() -> None:
    assert {"classical", "sam2", "cellpose", "noop"} <= set(available_plugins(registry.SEGMENTER_GROUP))
    assert {"morphology", "resnet50", "sam2_embedding"} <= set(available_plugins(registry.FEATURE_GROUP))


def test_unknown_plugin_names_the_alternatives() -> None:
    with pytest.raises(KeyError, match="classical"):
        create_segmenter("stardist-not-installed")


def test_lab_plugin_through_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    class LabSegmenter:
        name = "lab"

        def __init__(self, threshold: float) -> None:
            self.threshold = threshold

        def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
            return Segmentation((tile_rgb[..., 0] > self.threshold).astype(np.int32))

    class NotASegmenter:
        def __init__(self) -> None: ...

    fake = [
        SimpleNamespace(name="lab", load=lambda: LabSegmenter),
        SimpleNamespace(name="broken", load=lambda: NotASegmenter),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: fake)
    segmenter = create_segmenter("lab", threshold=10)
    result = segmenter.segment(np.full((4, 4, 3), 20, np.uint8), 0.25)
    assert result.n_cells == 1 and result.scores.tolist() == [1.0]
    with pytest.raises(TypeError, match="broken"):
        create_segmenter("broken")


def test_segmentation_validates_scores() -> None:
    labels = np.zeros((5, 5), np.int32)
    labels[1:3, 1:3] = 1
    labels[3:5, 3:5] = 2
    assert Segmentation(labels).n_cells == 2
    with pytest.raises(ValueError, match="scores"):
        Segmentation(labels, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        Segmentation(np.zeros((2, 2, 2), np.int32))
