"""How complete are the two nucleus references? A blind by-eye audit -> bench/results/reference_audit.json.

``bench/offdomain_nuclei.py`` shows that BM_GRAZ precision and challenge recall pull against each other, and
its montages suggest why: BM_GRAZ candidates "without a dot" look like nuclei the dots skip, and some
challenge nuclei "merged" by a candidate look like one nucleus that the reference outlines as several.
Either would make the measured numbers worse than the candidates are. This estimates how often, on a
seeded random sample rated by eye (by AI raters, not pathologists: ``bench/reference_audit/RATERS.md``).

Two steps:

* ``--sample`` draws the sample from the candidates of conf/base's defaults and writes the rating sheets
  (``bench/reference_audit/sheets/*.png``, ~15 MB, not committed: the same command redraws them pixel for
  pixel) and ``sample.csv`` (what each tile is; raters do not open it).
  * BM_GRAZ sheets mix, shuffled, without dots or scores: candidates kept at the default ``min_score``
    without a dot; candidates below it without a dot, the same number from each score band
    (:data:`LOW_BANDS`: their look changes with the score); candidates matched to a dot (a control that a
    rater who says "not a nucleus" too often fails); and decoys: the outline of a random low-score
    candidate moved onto tissue with no candidate and no dot within :data:`DECOY_CLEARANCE_UM` (a control
    that a rater who says "nucleus" too often fails). Question: is the outlined object a cell nucleus, of
    any type, or most of one? ``nucleus`` / ``not_nucleus`` / ``unsure``.
  * Challenge sheets show each sampled true nucleus lost as ``merged`` (the candidate covering most of it
    was matched to another true nucleus): the candidate (green) beside the reference, with the lost
    nucleus (cyan) and the one it lost to (magenta). Question: are cyan and magenta one nucleus that the
    reference splits (``one_nucleus``) or two nuclei (``several_nuclei``)? Or ``unsure``.
* the default run refuses a sample that this code would not draw again row for row (any change to the
  candidates, the dots or the seed makes it stale), reads every ``labels_<rater>.csv`` beside it
  (``sheet,tile,label``), and writes, with Wilson 95 % intervals:
  * per group (and per score band of the low group): the fraction that is a nucleus by consensus (every
    rater says ``nucleus``), each rater's counts, the raters' raw agreement and Cohen's kappa;
  * along ``min_score``: BM_GRAZ precision against the dots, and against the dots plus the estimated
    undotted nuclei (each unmatched candidate counted as the fraction of its score band; an envelope from
    the bands' interval ends), assuming that a nucleus without a dot is a right candidate;
  * the challenge recall when a nucleus the reference splits counts once: ``found / (true - f x merged)``
    with ``f`` the fraction of merged misses that are one nucleus. It only removes splits among the misses
    (a split nucleus whose pieces were both found still counts twice), so it is a partial correction.

Usage:
    python bench/reference_audit.py --sample   # once; then rate the sheets into labels_<rater>.csv
    python bench/reference_audit.py            # -> bench/results/reference_audit.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import offdomain_nuclei as od  # noqa: E402
import real_tissue  # noqa: E402

from mk_hspc.atomic_io import write_bytes_atomic  # noqa: E402
from mk_hspc.models.evaluation import match_points  # noqa: E402
from mk_hspc.models.segmenters.binning import unbin_labels  # noqa: E402
from mk_hspc.models.segmenters.classical import ClassicalSegmenter  # noqa: E402
from mk_hspc.models.segmenters.nuclei import HspcParams  # noqa: E402
from mk_hspc.models.stain import optical_density  # noqa: E402

AUDIT_DIR = REPO / "bench" / "reference_audit"
SEED = 20261130
KEPT, LOW, MATCHED, DECOY, MERGED = (
    "bm_graz_unmatched_kept",
    "bm_graz_unmatched_low",
    "bm_graz_matched",
    "bm_graz_decoy",
    "challenge_merged",
)
LOW_BANDS = (0.0, 0.05, 0.1, 0.2)  # lower edges of the low group's score bands; the last ends at min_score
SAMPLE_SIZES = {KEPT: 50, LOW: 80, MATCHED: 25, DECOY: 25, MERGED: 60}  # LOW: 20 per band
BM_LABELS = ("nucleus", "not_nucleus", "unsure")
MERGED_LABELS = ("one_nucleus", "several_nuclei", "unsure")
TILE_PX = 160
BM_CROP_UM = 20.0
CHALLENGE_CROP_UM = 24.0
DECOY_CLEARANCE_UM = 6.0  # no candidate pixel and no dot this close to a decoy's centre
BM_PER_SHEET, CHALLENGE_PER_SHEET = 30, 15


@dataclass(frozen=True)
class SampleRow:
    """One rated tile: where it is on the sheets, which group (and score band) it was drawn from."""

    sheet: str
    tile: int
    group: str
    band: str  # score band of the low group ("0.05-0.1"), else ""
    image: str
    x: float  # centre: candidate centroid, decoy centre, or the lost true nucleus' centroid (image px)
    y: float
    score: str  # the candidate's score, 4 decimals; "" for decoys


@dataclass(frozen=True)
class TileDrawing:
    """What a tile shows: the image around ``centre``, the outline of candidate ``outline_of`` moved by
    ``shift`` px (decoys), and for the challenge the reference with the two nuclei in question."""

    candidates: od.Candidates
    truth: od.Truth
    centre: tuple[int, int]
    outline_of: tuple[od.Candidates, int]
    shift: tuple[int, int] = (0, 0)
    highlight: tuple[int, int] | None = None  # challenge: (lost true nucleus, the one it lost to), 0-based


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial proportion (scipy); (0, 1) without trials."""
    if n == 0:
        return 0.0, 1.0
    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same tiles (scikit-learn); None when it is undefined
    (both raters gave one and the same label throughout)."""
    if len(set(a) | set(b)) < 2:
        return None
    return float(cohen_kappa_score(a, b))


def consensus(labels: Sequence[str], positive: str) -> bool:
    """True when every rater gave ``positive`` (conservative: one doubt and the tile does not count)."""
    return len(labels) > 0 and all(label == positive for label in labels)


def audited_precision(
    n_matched: int, n_unmatched_by_stratum: dict[str, int], fraction: dict[str, float]
) -> float:
    """Precision against the dots plus the estimated undotted nuclei: each unmatched candidate of a stratum
    counts as ``fraction[stratum]`` of a true positive."""
    n = n_matched + sum(n_unmatched_by_stratum.values())
    if n == 0:
        return 0.0
    extra = sum(count * fraction[stratum] for stratum, count in n_unmatched_by_stratum.items())
    return (n_matched + extra) / n


def score_band(score: float, min_score: float) -> str:
    """The low group's band of a score below ``min_score`` ("0.05-0.1"), or "kept" at or above it."""
    if score >= min_score:
        return "kept"
    edges = [*LOW_BANDS, min_score]
    k = int(np.searchsorted(edges, score, side="right")) - 1
    return f"{edges[k]:g}-{edges[k + 1]:g}"


@dataclass
class Domains:
    """Candidates and truth of BM_GRAZ (at its pixel size) and of the challenge at conf/base's defaults."""

    bm_graz: list[tuple[od.Candidates, od.Truth]]
    challenge: list[tuple[od.Candidates, od.Truth]]
    params: HspcParams

    def scores(self, candidates: od.Candidates) -> np.ndarray:
        return od.default_score(candidates.features, self.params)


def load_domains(shared: Path) -> Domains:
    params = ClassicalSegmenter(**real_tissue.default_classical_params()["hspc"]).params
    assert isinstance(params, HspcParams)
    data = od.load(shared, {}, scales=(1.0,))
    return Domains(data["bm_graz_1.0"], data["challenge"], params)


def bm_graz_groups(domains: Domains, candidates: od.Candidates, truth: od.Truth) -> dict[str, np.ndarray]:
    """Candidate indices of one BM_GRAZ image per audit group.

    ``KEPT``: at the default ``min_score``, kept and matched to no dot. ``LOW``: below it, and matched to no
    dot even when every candidate is kept. ``MATCHED``: kept at the default and matched to a dot.
    """
    scores = domains.scores(candidates)
    default = np.flatnonzero(od.detected(candidates, scores, domains.params.min_score))
    _, _, _, pairs = match_points(candidates.xy[default], truth.xy, truth.gate_px)
    matched = np.zeros(len(default), bool)
    matched[pairs[:, 0]] = True
    index, matched_all = od.kept_and_matched(candidates, truth)
    low = scores[index] < domains.params.min_score
    return {KEPT: default[~matched], LOW: index[low & ~matched_all], MATCHED: default[matched]}


def merged_misses(domains: Domains, candidates: od.Candidates, truth: od.Truth) -> list[tuple[int, int, int]]:
    """``(lost true nucleus, candidate covering most of it, true nucleus that candidate is matched to)`` of
    each challenge nucleus lost as ``merged`` (0-based indices)."""
    scores = domains.scores(candidates)
    categories = od.miss_categories(candidates, truth, scores, domains.params)
    index = np.flatnonzero(od.detected(candidates, scores, domains.params.min_score))
    _, _, _, pairs = match_points(candidates.xy[index], truth.xy, truth.gate_px)
    matched_to = {int(index[c]): int(k) for c, k in pairs}
    under = unbin_labels(candidates.labels, candidates.factor, truth.labels.shape)
    out = []
    for k in np.flatnonzero(np.asarray(categories) == "merged"):
        cover = np.bincount(under[truth.labels == k + 1], minlength=len(candidates.kept) + 1)
        cover[0] = 0
        c = int(cover.argmax()) - 1
        out.append((int(k), c, matched_to[c]))
    return out


def decoy_sites(candidates: od.Candidates, truth: od.Truth, params: HspcParams) -> np.ndarray:
    """``(n, 2)`` (x, y) image pixels where a decoy may go: tissue, a whole crop inside the image, and no
    candidate pixel (of any size or score) and no dot within :data:`DECOY_CLEARANCE_UM`."""
    rgb = candidates.rgb[..., :3]
    height, width = rgb.shape[:2]
    px = truth.pixel_um
    tissue = optical_density(rgb).sum(axis=-1) > params.min_tissue_od
    occupied = unbin_labels(candidates.labels, candidates.factor, (height, width)) > 0
    dots = np.round(truth.xy).astype(int)
    inside = (dots[:, 0] >= 0) & (dots[:, 0] < width) & (dots[:, 1] >= 0) & (dots[:, 1] < height)
    occupied[dots[inside, 1], dots[inside, 0]] = True
    clear = ndi.distance_transform_edt(~occupied) * px > DECOY_CLEARANCE_UM
    margin = int(np.ceil(BM_CROP_UM / px / 2))
    frame = np.zeros_like(clear)
    frame[margin : height - margin, margin : width - margin] = True
    ys, xs = np.nonzero(tissue & clear & frame)
    return np.stack([xs, ys], axis=1)


def draw_sample(domains: Domains) -> tuple[list[SampleRow], dict[tuple[str, int], TileDrawing]]:
    """The seeded sample, and what each ``(sheet, tile)`` shows."""
    rng = np.random.default_rng(SEED)
    min_score = domains.params.min_score
    pools: dict[str, list[tuple[str, TileDrawing, str]]] = {KEPT: [], MATCHED: []}
    pools.update({f"{LOW}:{score_band(edge, min_score)}": [] for edge in LOW_BANDS})
    for candidates, truth in domains.bm_graz:
        scores = domains.scores(candidates)
        for group, index in bm_graz_groups(domains, candidates, truth).items():
            for i in index.tolist():
                band = score_band(float(scores[i]), min_score)
                centre = tuple(int(round(v)) for v in candidates.xy[i])
                drawing = TileDrawing(candidates, truth, centre, (candidates, i))
                key = f"{LOW}:{band}" if group == LOW else group
                pools[key].append((band if group == LOW else "", drawing, f"{scores[i]:.4f}"))
    per_band = SAMPLE_SIZES[LOW] // len(LOW_BANDS)
    bm_tiles: list[tuple[str, str, TileDrawing, str]] = []
    for key, pool in pools.items():
        size = per_band if key.startswith(LOW) else SAMPLE_SIZES[key]
        for j in sorted(rng.choice(len(pool), min(size, len(pool)), replace=False).tolist()):
            band, drawing, score = pool[j]
            bm_tiles.append((key.split(":")[0], band, drawing, score))
    low_shapes = [t[2].outline_of for t in bm_tiles if t[0] == LOW]
    sites = [(c, t, decoy_sites(c, t, domains.params)) for c, t in domains.bm_graz]
    for _ in range(SAMPLE_SIZES[DECOY]):
        candidates, truth, where = sites[int(rng.integers(len(sites)))]
        centre = tuple(int(v) for v in where[int(rng.integers(len(where)))])
        source = low_shapes[int(rng.integers(len(low_shapes)))]
        own = tuple(int(round(v)) for v in source[0].xy[source[1]])
        shift = (centre[0] - own[0], centre[1] - own[1])
        bm_tiles.append((DECOY, "", TileDrawing(candidates, truth, centre, source, shift), ""))
    bm_tiles = [bm_tiles[j] for j in rng.permutation(len(bm_tiles)).tolist()]  # blind: groups mixed
    merged = [
        (candidates, truth, lost, c, winner)
        for candidates, truth in domains.challenge
        for lost, c, winner in merged_misses(domains, candidates, truth)
    ]
    challenge_tiles = []
    for j in sorted(rng.choice(len(merged), min(SAMPLE_SIZES[MERGED], len(merged)), replace=False).tolist()):
        candidates, truth, lost, c, winner = merged[j]
        centre = tuple(int(round(v)) for v in truth.xy[lost])
        drawing = TileDrawing(candidates, truth, centre, (candidates, c), highlight=(lost, winner))
        challenge_tiles.append((MERGED, "", drawing, f"{domains.scores(candidates)[c]:.4f}"))
    rows, drawings = [], {}
    for prefix, per_sheet, tiles in (
        ("bm", BM_PER_SHEET, bm_tiles),
        ("challenge", CHALLENGE_PER_SHEET, challenge_tiles),
    ):
        for n, (group, band, drawing, score) in enumerate(tiles):
            sheet, tile = f"{prefix}_{n // per_sheet + 1}", n % per_sheet + 1
            x, y = drawing.centre
            rows.append(SampleRow(sheet, tile, group, band, drawing.truth.name, float(x), float(y), score))
            drawings[(sheet, tile)] = drawing
    return rows, drawings


def near_border(domains: Domains, margin_px: float = real_tissue.NUCLEUS_MATCH_RADIUS_PX) -> dict[str, dict]:
    """Per BM_GRAZ group, how many candidates lie within the match gate of the image border, where a dot may be
    left out on purpose (a nucleus cut by the image edge): a reading of how much of the undotted share is that."""
    counts: dict[str, list[int]] = {}
    for candidates, truth in domains.bm_graz:
        height, width = candidates.rgb.shape[:2]
        for group, index in bm_graz_groups(domains, candidates, truth).items():
            x, y = candidates.xy[index, 0], candidates.xy[index, 1]
            near = (
                (x < margin_px) | (y < margin_px) | (x > width - 1 - margin_px) | (y > height - 1 - margin_px)
            )
            entry = counts.setdefault(group, [0, 0])
            entry[0] += int(near.sum())
            entry[1] += len(index)
    return {
        g: {"near": a, "n": n, "fraction": round(a / n, 4) if n else None}
        for g, (a, n) in sorted(counts.items())
    }


def populations(domains: Domains) -> dict[str, int]:
    """How many candidates (or merged misses) each group and low-score band holds: what the sample stands for."""
    counts: dict[str, int] = {}
    min_score = domains.params.min_score
    for candidates, truth in domains.bm_graz:
        scores = domains.scores(candidates)
        for group, index in bm_graz_groups(domains, candidates, truth).items():
            counts[group] = counts.get(group, 0) + len(index)
            if group == LOW:
                for i in index.tolist():
                    key = f"{LOW}:{score_band(float(scores[i]), min_score)}"
                    counts[key] = counts.get(key, 0) + 1
    counts[MERGED] = sum(len(merged_misses(domains, c, t)) for c, t in domains.challenge)
    return dict(sorted(counts.items()))


def render_tile(drawing: TileDrawing) -> np.ndarray:
    """A BM_GRAZ tile (20 µm, the outline in green) or a challenge pair (24 µm: candidate | reference with the
    lost nucleus in cyan and the one it lost to in magenta, other reference nuclei thin yellow)."""
    import cv2

    px = drawing.truth.pixel_um
    half = int(round((CHALLENGE_CROP_UM if drawing.highlight else BM_CROP_UM) / px / 2))

    def window(image: np.ndarray, centre: tuple[int, int], fill: int) -> np.ndarray:
        pad = ((half, half), (half, half)) + ((0, 0),) * (image.ndim - 2)
        padded = np.pad(image, pad, constant_values=fill)
        return np.ascontiguousarray(
            padded[centre[1] : centre[1] + 2 * half, centre[0] : centre[0] + 2 * half]
        )

    def outlined(
        mask: np.ndarray, colour: tuple[int, int, int], base: np.ndarray, thickness: int
    ) -> np.ndarray:
        small = cv2.resize(mask.astype(np.uint8), (TILE_PX, TILE_PX), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        return cv2.drawContours(base, contours, -1, colour, thickness)

    source, c = drawing.outline_of
    under = unbin_labels(source.labels, source.factor, source.rgb.shape[:2])
    source_centre = (drawing.centre[0] - drawing.shift[0], drawing.centre[1] - drawing.shift[1])
    mask = window(under, source_centre, 0) == c + 1
    rgb = window(drawing.candidates.rgb[..., :3], drawing.centre, 255)
    base = cv2.resize(rgb, (TILE_PX, TILE_PX), interpolation=cv2.INTER_CUBIC)
    left = outlined(mask, (0, 220, 0), base.copy(), 1)
    if drawing.highlight is None:
        return left
    reference = window(drawing.truth.labels, drawing.centre, 0)
    right = base.copy()
    lost, winner = drawing.highlight
    for value in np.unique(reference[reference > 0]).tolist():
        if value not in (lost + 1, winner + 1):
            right = outlined(reference == value, (255, 220, 0), right, 1)
    right = outlined(reference == lost + 1, (0, 230, 255), right, 2)
    right = outlined(reference == winner + 1, (255, 0, 255), right, 2)
    return np.hstack([left, np.full((TILE_PX, 4, 3), 255, np.uint8), right])


def write_sheets(rows: list[SampleRow], drawings: dict[tuple[str, int], TileDrawing], folder: Path) -> None:
    """One PNG per sheet: numbered tiles, 6 (BM_GRAZ) or 3 (challenge pairs) per row."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for sheet in sorted({row.sheet for row in rows}):
        tiles = []
        for row in (r for r in rows if r.sheet == sheet):
            image = render_tile(drawings[(sheet, row.tile)])
            header = np.full((18, image.shape[1], 3), 255, np.uint8)
            cv2.putText(
                header, str(row.tile), (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA
            )
            tiles.append(np.pad(np.vstack([header, image]), ((0, 6), (0, 6), (0, 0)), constant_values=255))
        columns = 6 if sheet.startswith("bm") else 3
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
        grid = np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])
        cv2.imwrite(str(folder / f"{sheet}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


SAMPLE_FIELDS = ("sheet", "tile", "group", "band", "image", "x", "y", "score")


def sample_text(rows: list[SampleRow]) -> str:
    """``sample.csv``'s exact text for ``rows`` (also what a stale sample is compared against)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SAMPLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({field: getattr(row, field) for field in SAMPLE_FIELDS} for row in rows)
    return buffer.getvalue()


def read_sample(path: Path) -> list[SampleRow]:
    with path.open(newline="") as handle:
        return [
            SampleRow(
                r["sheet"],
                int(r["tile"]),
                r["group"],
                r["band"],
                r["image"],
                float(r["x"]),
                float(r["y"]),
                r["score"],
            )
            for r in csv.DictReader(handle)
        ]


class StaleSampleError(RuntimeError):
    """The audit sample is not what this code draws: its labels describe other candidates."""


def check_sample(path: Path, rows: list[SampleRow]) -> None:
    """Refuse ``path`` unless it is exactly the sample ``rows`` that this code and data draw now."""
    expected = sample_text(rows).splitlines()
    found = path.read_text().splitlines()
    for line, (have, want) in enumerate(zip(found, expected, strict=False), start=1):
        if have != want:
            raise StaleSampleError(
                f"{path}:{line}: the sample is stale ({have!r}, this code draws {want!r}); draw a new one "
                "(--sample) and rate it"
            )
    if len(found) != len(expected):
        raise StaleSampleError(
            f"{path}: {len(found) - 1} rows, this code draws {len(expected) - 1}; draw a new one"
        )


def read_labels(path: Path, rows: list[SampleRow]) -> dict[tuple[str, int], str]:
    """One rater's ``sheet,tile,label`` file, checked: every tile rated once with a label its sheet allows."""
    allowed = {
        (row.sheet, row.tile): BM_LABELS if row.sheet.startswith("bm") else MERGED_LABELS for row in rows
    }
    labels: dict[tuple[str, int], str] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or list(reader.fieldnames) != ["sheet", "tile", "label"]:
            raise ValueError(f"{path}: the header must be 'sheet,tile,label', not {reader.fieldnames}")
        for r in reader:
            where = f"{path}:{reader.line_num}"
            try:
                key = (r["sheet"], int(r["tile"]))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: tile {r['tile']!r} is not a number") from None
            if key not in allowed:
                raise ValueError(f"{where}: no tile {key[1]} on sheet {key[0]!r} in the sample")
            if r["label"] not in allowed[key]:
                raise ValueError(f"{where}: label {r['label']!r} is not one of {allowed[key]}")
            if key in labels:
                raise ValueError(f"{where}: tile {key[1]} of sheet {key[0]!r} is rated twice")
            labels[key] = r["label"]
    missing = sorted(set(allowed) - set(labels))
    if missing:
        raise ValueError(f"{path}: {len(missing)} tiles are not rated, first {missing[0]}")
    return labels


def proportion(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {
        "n": n,
        "count": successes,
        "fraction": successes / n if n else None,
        "ci95": [round(low, 4), round(high, 4)],
    }


def strata(rows: list[SampleRow]) -> dict[str, list[SampleRow]]:
    """The rows of each group, and of each score band of the low group (``"<LOW>:<band>"``)."""
    out: dict[str, list[SampleRow]] = {}
    for row in rows:
        out.setdefault(row.group, []).append(row)
        if row.band:
            out.setdefault(f"{row.group}:{row.band}", []).append(row)
    return out


def rater_summary(rows: list[SampleRow], raters: dict[str, dict[tuple[str, int], str]]) -> dict:
    """Per group and low-score band: consensus, each rater's counts, raw agreement and kappa per pair."""
    names = sorted(raters)
    out: dict = {"raters": names, "groups": {}}
    for group, members in strata(rows).items():
        allowed = MERGED_LABELS if group == MERGED else BM_LABELS
        keys = [(r.sheet, r.tile) for r in members]
        given = [[raters[name][key] for name in names] for key in keys]
        entry = {
            "consensus": proportion(sum(consensus(labels, allowed[0]) for labels in given), len(keys)),
            "any_rater": proportion(sum(allowed[0] in labels for labels in given), len(keys)),
            "per_rater": {
                name: {label: sum(raters[name][k] == label for k in keys) for label in allowed}
                for name in names
            },
            "raw_agreement": round(float(np.mean([len(set(labels)) == 1 for labels in given])), 4)
            if given
            else None,
            "kappa": {},
        }
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                kappa = cohen_kappa([raters[a][k] for k in keys], [raters[b][k] for k in keys])
                entry["kappa"][f"{a} vs {b}"] = None if kappa is None else round(kappa, 3)
        out["groups"][group] = entry
    return out


def stratum_fractions(summary: dict, min_score: float) -> dict[str, tuple[float, float, float]]:
    """``(estimate, ci low, ci high)`` of the nucleus fraction per sweep stratum ("kept" or a low band) and of
    the one-nucleus fraction of the merged misses ("merged")."""
    groups = summary["groups"]
    out = {}
    keys = {"kept": KEPT, "merged": MERGED} | {
        score_band(edge, min_score): f"{LOW}:{score_band(edge, min_score)}" for edge in LOW_BANDS
    }
    for stratum, group in keys.items():
        if group not in groups or groups[group]["consensus"]["n"] == 0:
            raise ValueError(f"the sample has no rated tile of {group}: its fraction cannot be estimated")
        c = groups[group]["consensus"]
        out[stratum] = (c["count"] / c["n"], *c["ci95"])
    return out


def precision_sweep(domains: Domains, fractions: dict[str, tuple[float, float, float]]) -> list[dict]:
    """Along ``min_score``: BM_GRAZ precision against the dots and audited (estimate and the envelope of the
    strata's interval ends), challenge recall against the reference and with split nuclei counted once."""
    import dataclasses

    default = domains.params.min_score
    out = []
    for min_score in real_tissue.SCORE_GRID[:9]:
        dots, audited = [], {0: [], 1: [], 2: []}
        for candidates, truth in domains.bm_graz:
            scores = domains.scores(candidates)
            index = np.flatnonzero(od.detected(candidates, scores, min_score))
            _, _, _, pairs = match_points(candidates.xy[index], truth.xy, truth.gate_px)
            unmatched = np.setdiff1d(np.arange(len(index)), pairs[:, 0])
            by_stratum: dict[str, int] = {}
            for i in index[unmatched].tolist():
                stratum = score_band(float(scores[i]), default)
                by_stratum[stratum] = by_stratum.get(stratum, 0) + 1
            dots.append(len(pairs) / len(index) if len(index) else 0.0)
            for end in audited:
                fraction = {stratum: values[end] for stratum, values in fractions.items()}
                audited[end].append(audited_precision(len(pairs), by_stratum, fraction))
        p = dataclasses.replace(domains.params, min_score=min_score)
        recall, once = [], {0: [], 1: [], 2: []}
        for candidates, truth in domains.challenge:
            names = od.miss_categories(candidates, truth, domains.scores(candidates), p)
            found, merged = names.count("found"), names.count("merged")
            recall.append(found / len(names))
            for end in once:
                once[end].append(found / (len(names) - fractions["merged"][end] * merged))
        out.append(
            {
                "min_score": min_score,
                "bm_graz_precision_vs_dots": round(float(np.mean(dots)), 4),
                "bm_graz_precision_audited": round(float(np.mean(audited[0])), 4),
                "bm_graz_precision_audited_range": [round(float(np.mean(audited[e])), 4) for e in (1, 2)],
                "offdomain_recall_vs_reference": round(float(np.mean(recall)), 4),
                "offdomain_recall_split_nuclei_once": round(float(np.mean(once[0])), 4),
                "offdomain_recall_split_nuclei_once_range": [
                    round(float(np.mean(once[e])), 4) for e in (1, 2)
                ],
            }
        )
    return out


def measure(shared: Path, folder: Path) -> dict:
    sample_path = folder / "sample.csv"
    rows = read_sample(sample_path)
    raters = {
        path.stem.removeprefix("labels_"): read_labels(path, rows)
        for path in sorted(folder.glob("labels_*.csv"))
    }
    if not raters:
        raise FileNotFoundError(f"{folder}: no labels_<rater>.csv; rate the sheets first")
    domains = load_domains(shared)
    check_sample(sample_path, draw_sample(domains)[0])
    summary = rater_summary(rows, raters)
    fractions = stratum_fractions(summary, domains.params.min_score)
    return {
        "seed": SEED,
        "default_min_score": domains.params.min_score,
        "populations": populations(domains),
        "within_the_gate_of_the_image_border": near_border(domains),
        "sample": summary,
        "sweep": precision_sweep(domains, fractions),
        "assumptions": [
            "a nucleus without a dot is a right candidate (the dots' protocol may skip some on purpose)",
            "fractions are consensus ones: a tile counts only when every rater gives the positive label",
            "audited ranges use every stratum's Wilson interval end at once (an envelope, not an interval)",
            "the split-nuclei recall removes splits among the misses only (a partial correction)",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--folder", type=Path, default=AUDIT_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reference_audit.json")
    parser.add_argument("--sample", action="store_true", help="draw the sample and write the rating sheets")
    args = parser.parse_args()
    if args.sample:
        rows, drawings = draw_sample(load_domains(args.shared))
        args.folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.folder / "sample.csv", sample_text(rows).encode())
        write_sheets(rows, drawings, args.folder / "sheets")
        print(f"{len(rows)} tiles on {len({r.sheet for r in rows})} sheets in {args.folder / 'sheets'}")
        return
    result = measure(args.shared, args.folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())  # never a cut-off result
    print(json.dumps({g: v["consensus"] for g, v in result["sample"]["groups"].items()}, indent=2))
    print(json.dumps(result["sweep"], indent=2))


if __name__ == "__main__":
    main()
