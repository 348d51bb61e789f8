"""The reference audit's statistics, label checks and stale-sample refusal, on hand-made numbers and points."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mk_hspc.models.segmenters.nuclei import HspcParams
from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def audit():
    module = load_bench_script("reference_audit")
    yield module
    sys.modules.pop(module.__name__, None)


def test_wilson_interval(audit) -> None:
    assert audit.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = audit.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = audit.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


def test_cohen_kappa(audit) -> None:
    assert audit.cohen_kappa(["nucleus", "not_nucleus"], ["nucleus", "not_nucleus"]) == pytest.approx(1.0)
    # Observed agreement 2/3, chance agreement 4/9: kappa = (2/3 - 4/9) / (5/9) = 0.4.
    assert audit.cohen_kappa(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(0.4)
    assert audit.cohen_kappa(["nucleus"] * 3, ["nucleus"] * 3) is None


def test_consensus_needs_every_rater(audit) -> None:
    assert audit.consensus(["nucleus", "nucleus"], "nucleus")
    assert not audit.consensus(["nucleus", "unsure"], "nucleus")
    assert not audit.consensus([], "nucleus")


def test_audited_precision_counts_unmatched_candidates_by_their_group_fraction(audit) -> None:
    fraction = {"kept": 0.9, "low": 0.5}
    assert audit.audited_precision(60, {"kept": 20, "low": 20}, fraction) == pytest.approx(0.88)
    assert audit.audited_precision(60, {"kept": 0, "low": 0}, fraction) == 1.0
    assert audit.audited_precision(0, {"kept": 0, "low": 0}, fraction) == 0.0


def _rows(audit) -> list:
    return [
        audit.SampleRow("bm_1", 1, "bm_graz_matched", "img", 1.0, 2.0, 0.9),
        audit.SampleRow("challenge_1", 1, "challenge_merged", "ch", 3.0, 4.0, 0.8),
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("bm_1,1,nucleus\nchallenge_1,1,one_nucleus\nbm_1,2,nucleus\n", "no tile 2 on sheet 'bm_1'"),
        ("bm_1,1,one_nucleus\nchallenge_1,1,one_nucleus\n", "label 'one_nucleus' is not one of"),
        ("bm_1,1,nucleus\nbm_1,1,unsure\nchallenge_1,1,unsure\n", "rated twice"),
        ("bm_1,1,nucleus\n", "1 tiles are not rated"),
    ],
)
def test_read_labels_names_the_file_and_the_problem(audit, tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "labels_x.csv"
    path.write_text("sheet,tile,label\n" + body)
    with pytest.raises(ValueError, match=problem) as error:
        audit.read_labels(path, _rows(audit))
    assert str(path) in str(error.value)


def test_read_labels_accepts_a_complete_file(audit, tmp_path: Path) -> None:
    path = tmp_path / "labels_x.csv"
    path.write_text("sheet,tile,label\nchallenge_1,1,several_nuclei\nbm_1,1,not_nucleus\n")
    assert audit.read_labels(path, _rows(audit)) == {
        ("bm_1", 1): "not_nucleus",
        ("challenge_1", 1): "several_nuclei",
    }


def test_check_sample_refuses_a_tile_that_left_its_group(audit) -> None:
    """Two equal, well-contrasted candidates: one on a dot (matched), one 100 px from any dot (unmatched)."""
    od = sys.modules["offdomain_nuclei"]
    n = 30  # enough candidates for the tile's typical nucleus to be their own median
    features = {
        "area_um2": np.full(n, 30.0),
        "width_um": np.full(n, 6.0),
        "contrast": np.full(n, 3.0),
        "centroid_x": np.arange(n) * 100.0,
        "centroid_y": np.zeros(n),
    }
    candidates = od.Candidates(
        features, np.ones(n, bool), np.stack([np.arange(n) * 100.0, np.zeros(n)], 1), None, 1
    )
    truth = od.Truth("img", np.array([[0.0, 0.0]]), 16.0)
    domains = audit.Domains([(candidates, truth)], [], HspcParams())
    good = [
        audit.SampleRow("bm_1", 1, "bm_graz_matched", "img", 0.0, 0.0, 0.9),
        audit.SampleRow("bm_1", 2, "bm_graz_unmatched_kept", "img", 100.0, 0.0, 0.9),
    ]
    audit.check_sample(good, domains)
    stale = [audit.SampleRow("bm_1", 3, "bm_graz_matched", "img", 100.0, 0.0, 0.9)]
    with pytest.raises(audit.StaleSampleError, match="sheet bm_1 tile 3"):
        audit.check_sample(stale, domains)


def test_rater_summary_counts_a_tile_only_when_every_rater_agrees(audit) -> None:
    rows = [
        audit.SampleRow("bm_1", 1, "bm_graz_unmatched_low", "img", 0.0, 0.0, 0.1),
        audit.SampleRow("bm_1", 2, "bm_graz_unmatched_low", "img", 9.0, 0.0, 0.1),
        audit.SampleRow("bm_1", 3, "bm_graz_unmatched_low", "img", 18.0, 0.0, 0.1),
        audit.SampleRow("challenge_1", 1, "challenge_merged", "ch", 0.0, 0.0, 0.5),
        audit.SampleRow("challenge_1", 2, "challenge_merged", "ch", 9.0, 0.0, 0.5),
    ]
    raters = {
        "a": {
            ("bm_1", 1): "nucleus",
            ("bm_1", 2): "nucleus",
            ("bm_1", 3): "not_nucleus",
            ("challenge_1", 1): "one_nucleus",
            ("challenge_1", 2): "several_nuclei",
        },
        "b": {
            ("bm_1", 1): "nucleus",
            ("bm_1", 2): "unsure",
            ("bm_1", 3): "not_nucleus",
            ("challenge_1", 1): "one_nucleus",
            ("challenge_1", 2): "several_nuclei",
        },
    }
    summary = audit.rater_summary(rows, raters)
    low = summary["groups"]["bm_graz_unmatched_low"]
    assert (low["consensus"]["count"], low["consensus"]["n"]) == (1, 3)
    assert low["per_rater"]["b"] == {"nucleus": 1, "not_nucleus": 1, "unsure": 1}
    assert summary["groups"]["challenge_merged"]["consensus"]["count"] == 1
    assert summary["groups"]["bm_graz_matched"]["consensus"]["n"] == 0
    assert summary["kappa"]["challenge: a vs b"] == pytest.approx(1.0)
    assert summary["kappa"]["bm: a vs b"] == pytest.approx(0.5)  # agreement 2/3, chance 1/3
