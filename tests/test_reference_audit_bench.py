"""The reference audit: its statistics, label checks, groups, sample and stale-sample refusal, and one sweep
row, on hand-made numbers and a hand-made pair of images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mk_hspc.models.segmenters.nuclei import HspcParams
from tests.conftest import loaded_bench_script


@pytest.fixture(scope="module")
def audit():
    with loaded_bench_script("reference_audit") as module:
        yield module


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


def test_audited_precision_counts_unmatched_candidates_by_their_stratum_fraction(audit) -> None:
    fraction = {"kept": 0.9, "0-0.05": 0.5}
    assert audit.audited_precision(60, {"kept": 20, "0-0.05": 20}, fraction) == pytest.approx(0.88)
    assert audit.audited_precision(60, {}, fraction) == 1.0
    assert audit.audited_precision(0, {}, fraction) == 0.0


def test_score_band(audit) -> None:
    assert [audit.score_band(s, 0.35) for s in (0.0, 0.049, 0.05, 0.15, 0.3499, 0.35, 0.9)] == [
        "0-0.05",
        "0-0.05",
        "0.05-0.1",
        "0.1-0.2",
        "0.2-0.35",
        "kept",
        "kept",
    ]


def _rows(audit) -> list:
    return [
        audit.SampleRow("bm_1", 1, audit.MATCHED, "", "img", 1.0, 2.0, "0.9000"),
        audit.SampleRow("challenge_1", 1, audit.MERGED, "", "ch", 3.0, 4.0, "0.8000"),
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("sheet,tile,answer\n", "the header must be 'sheet,tile,label'"),
        ("sheet,tile,label\nbm_1,one,nucleus\n", ":2: tile 'one' is not a number"),
        (
            "sheet,tile,label\nbm_1,1,nucleus\nchallenge_1,1,one_nucleus\nbm_1,2,nucleus\n",
            ":4: no tile 2 on sheet",
        ),
        ("sheet,tile,label\nbm_1,1,one_nucleus\n", ":2: label 'one_nucleus' is not one of"),
        ("sheet,tile,label\nbm_1,1,nucleus\nbm_1,1,unsure\n", ":3: tile 1 of sheet 'bm_1' is rated twice"),
        ("sheet,tile,label\nbm_1,1,nucleus\n", "1 tiles are not rated"),
    ],
)
def test_read_labels_names_the_file_line_and_problem(audit, tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "labels_x.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=problem) as error:
        audit.read_labels(path, _rows(audit))
    assert str(path) in str(error.value)


def test_rater_summary_counts_a_tile_only_when_every_rater_agrees(audit) -> None:
    low = audit.LOW
    rows = [
        audit.SampleRow("bm_1", 1, low, "0-0.05", "img", 0.0, 0.0, "0.0100"),
        audit.SampleRow("bm_1", 2, low, "0-0.05", "img", 9.0, 0.0, "0.0200"),
        audit.SampleRow("bm_1", 3, low, "0.2-0.35", "img", 18.0, 0.0, "0.3000"),
        audit.SampleRow("challenge_1", 1, audit.MERGED, "", "ch", 0.0, 0.0, "0.5000"),
        audit.SampleRow("challenge_1", 2, audit.MERGED, "", "ch", 9.0, 0.0, "0.5000"),
    ]
    a = ["nucleus", "nucleus", "not_nucleus", "one_nucleus", "several_nuclei"]
    b = ["nucleus", "unsure", "not_nucleus", "several_nuclei", "several_nuclei"]
    keys = [(r.sheet, r.tile) for r in rows]
    summary = audit.rater_summary(
        rows, {"a": dict(zip(keys, a, strict=True)), "b": dict(zip(keys, b, strict=True))}
    )
    group = summary["groups"][low]
    assert (group["consensus"]["count"], group["consensus"]["n"]) == (1, 3)
    assert group["per_rater"]["b"] == {"nucleus": 1, "not_nucleus": 1, "unsure": 1}
    assert group["raw_agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert group["kappa"]["a vs b"] == pytest.approx(0.5)  # agreement 2/3, chance 1/3
    band = summary["groups"][f"{low}:0-0.05"]
    assert (band["consensus"]["count"], band["consensus"]["n"]) == (1, 2)
    merged = summary["groups"][audit.MERGED]
    assert merged["consensus"]["count"] == 0 and merged["any_rater"]["count"] == 1
    with pytest.raises(ValueError, match="no rated tile of bm_graz_unmatched_kept"):
        audit.stratum_fractions(summary, 0.35)


# ------------------------------------------------------------------------------------- hand-made images
def _features(widths: list[float], contrasts: list[float], xy: list[tuple[float, float]]) -> dict:
    return {
        "area_um2": np.full(len(widths), 30.0),
        "width_um": np.array(widths),
        "contrast": np.array(contrasts),
        "centroid_x": np.array([p[0] for p in xy]),
        "centroid_y": np.array([p[1] for p in xy]),
    }


def _domains(audit):
    """BM: candidate 0 on a dot, 1 without a dot (both score ~0.8), 2 small and faint without a dot (score
    ~0.005). Challenge: two touching true nuclei under one candidate, matched to the left one."""
    od = sys.modules["offdomain_nuclei"]
    labels = np.zeros((120, 120), np.int32)
    centres = [(40, 40), (80, 40), (40, 80)]
    for value, (x, y) in enumerate(centres, start=1):
        labels[y - 6 : y + 6, x - 6 : x + 6] = value
    rgb = np.empty((120, 120, 3), np.uint8)
    rgb[...] = (200, 120, 160)  # pink tissue: optical density 0.63
    xy = np.array(centres, float) - 0.5  # centroids of the 12 px squares
    bm = od.Candidates(
        _features([6.0, 6.0, 2.0], [3.0, 3.0, 1.0], [tuple(p) for p in xy]),
        np.ones(3, bool),
        xy,
        labels,
        1,
        rgb,
    )
    bm_truth = od.Truth("bm_image", np.array([[39.5, 39.5]]), 16.0)
    truth_labels = np.zeros((60, 60), np.int64)
    truth_labels[25:35, 20:30], truth_labels[25:35, 30:40] = 1, 2
    candidate = np.zeros((60, 60), np.int32)
    candidate[25:35, 20:38] = 1
    ch = od.Candidates(
        _features([6.0], [3.0], [(28.5, 29.5)]),
        np.ones(1, bool),
        np.array([[28.5, 29.5]]),
        candidate,
        1,
        np.full((60, 60, 3), 200, np.uint8),
    )
    ch_truth = od.Truth("ch_image", np.array([[24.5, 29.5], [34.5, 29.5]]), 11.2, truth_labels)
    return audit.Domains([(bm, bm_truth)], [(ch, ch_truth)], HspcParams())


def test_groups_and_merged_misses_on_hand_made_images(audit) -> None:
    domains = _domains(audit)
    (bm, bm_truth), (ch, ch_truth) = domains.bm_graz[0], domains.challenge[0]
    groups = audit.bm_graz_groups(domains, bm, bm_truth)
    assert {k: v.tolist() for k, v in groups.items()} == {audit.KEPT: [1], audit.LOW: [2], audit.MATCHED: [0]}
    # The right nucleus is lost: the candidate covering most of it (0) was matched to the left one (0).
    assert audit.merged_misses(domains, ch, ch_truth) == [(1, 0, 0)]
    # Candidate 0's centroid (39.5, 39.5) is 23.5 px from the border, beyond a 16 px gate; all are inside.
    assert audit.near_border(domains)[audit.KEPT] == {"near": 0, "n": 1, "fraction": 0.0}
    assert audit.near_border(domains, margin_px=40.0)[audit.MATCHED] == {"near": 1, "n": 1, "fraction": 1.0}
    sites = audit.decoy_sites(bm, bm_truth, domains.params)
    assert len(sites) > 0
    occupied = np.argwhere(bm.labels > 0)[:, ::-1]
    nearest_um = (
        np.min(np.hypot(*(sites[:, None, :] - occupied[None, :, :]).transpose(2, 0, 1)), axis=1) * 0.35
    )
    assert nearest_um.min() > audit.DECOY_CLEARANCE_UM


def test_sample_is_drawn_the_same_and_a_changed_one_is_refused(audit, tmp_path: Path) -> None:
    domains = _domains(audit)
    rows, drawings = audit.draw_sample(domains)
    assert audit.sample_text(rows) == audit.sample_text(audit.draw_sample(domains)[0])
    assert [r.group for r in rows].count(audit.DECOY) == audit.SAMPLE_SIZES[audit.DECOY]
    assert {r.group for r in rows} == {audit.KEPT, audit.LOW, audit.MATCHED, audit.DECOY, audit.MERGED}
    path = tmp_path / "sample.csv"
    path.write_text(audit.sample_text(rows))
    audit.check_sample(path, rows)
    assert audit.read_sample(path) == rows
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("bm_image", "other_image")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(audit.StaleSampleError, match=f"{path}:3: the sample is stale"):
        audit.check_sample(path, rows)
    tile = audit.render_tile(drawings[(rows[0].sheet, rows[0].tile)])
    assert tile.shape == (audit.TILE_PX, audit.TILE_PX, 3)
    merged = next(r for r in rows if r.group == audit.MERGED)
    pair = audit.render_tile(drawings[(merged.sheet, merged.tile)])
    assert pair.shape == (audit.TILE_PX, 2 * audit.TILE_PX + 4, 3)
    assert np.all(pair[:, : audit.TILE_PX] == (0, 220, 0), axis=-1).any()  # the candidate's outline
    assert np.all(pair[:, audit.TILE_PX + 4 :] == (255, 0, 255), axis=-1).any()  # the nucleus it won


def test_sweep_row_by_hand(audit) -> None:
    domains = _domains(audit)
    fractions = {s: (0.5, 0.25, 0.75) for s in ("0-0.05", "0.05-0.1", "0.1-0.2", "0.2-0.35")}
    fractions |= {"kept": (1.0, 0.9, 1.0), "merged": (1.0, 0.5, 1.0)}
    first, second = audit.precision_sweep(domains, fractions)[:2]
    assert first["min_score"] == 0.0 and first["bm_graz_precision_vs_dots"] == pytest.approx(1 / 3, abs=1e-4)
    assert first["bm_graz_precision_audited"] == pytest.approx(2.5 / 3, abs=1e-4)  # 1 + 1.0 + 0.5 of 3
    assert first["bm_graz_precision_audited_range"] == pytest.approx([2.15 / 3, 2.75 / 3], abs=1e-4)
    assert first["offdomain_recall_vs_reference"] == 0.5  # one of the two true nuclei
    assert first["offdomain_recall_split_nuclei_once"] == 1.0  # the lost one is half of one nucleus
    assert first["offdomain_recall_split_nuclei_once_range"] == pytest.approx([1 / 1.5, 1.0], abs=1e-4)
    assert second["min_score"] == 0.05 and second["bm_graz_precision_vs_dots"] == 0.5  # the faint one gone
