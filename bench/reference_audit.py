"""How complete are the two nucleus references? A blind by-eye audit -> bench/results/reference_audit.json.

``bench/offdomain_nuclei.py`` shows that BM_GRAZ precision and challenge recall pull against each other, and
its montages suggest why: BM_GRAZ candidates "without a dot" look like nuclei the dots skip, and many
challenge nuclei "merged" by a candidate look like one nucleus that the reference outlines as several.
Both would make the measured numbers worse than the candidates are. This measures how often, on a seeded
random sample rated by eye (not by a pathologist), so the team can judge the goals against the references.

Two steps:

* ``--sample`` draws the sample from the candidates of conf/base's defaults and writes rating sheets
  (``bench/reference_audit/sheets/*.png``, 12 MB, not committed: the same command redraws them pixel for
  pixel) and ``sample.csv`` (what each tile is; raters do not open it).
  * BM_GRAZ sheets mix, shuffled and without dots or scores (blind): candidates kept at the default
    ``min_score`` without a dot, candidates below it without a dot, and candidates matched to a dot (the
    control: a rater who calls those "not a nucleus" is not reliable). Question: is the outlined object
    a cell nucleus? ``nucleus`` / ``not_nucleus`` / ``unsure``.
  * Challenge sheets show each true nucleus lost as ``merged`` (its candidate was matched to another true
    nucleus): the candidate (green) beside the reference's outlines (yellow). Question: is the candidate
    one nucleus that the reference splits (``one_nucleus``), or several nuclei the candidate merges
    (``several_nuclei``), or ``unsure``?
* the default run reads every ``labels_<rater>.csv`` beside the sample (``sheet,tile,label``), checks that
  the sample still matches the candidates of the current code (it refuses a stale sample by name), and
  writes, with Wilson 95 % intervals and Cohen's kappa between raters:
  * the fraction of each BM_GRAZ group that is a nucleus by consensus (every rater says ``nucleus``);
  * BM_GRAZ precision along ``min_score`` against the dots, and against the dots plus the estimated
    unannotated nuclei (each unmatched candidate counted as that fraction of its group);
  * the fraction of the challenge's ``merged`` misses that are one nucleus by consensus, and the recall
    against a reference in which such a nucleus counts once.

Usage:
    python bench/reference_audit.py --sample   # once; then rate the sheets into labels_<rater>.csv
    python bench/reference_audit.py            # -> bench/results/reference_audit.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import offdomain_nuclei as od  # noqa: E402
import real_tissue  # noqa: E402

from mk_hspc.models.evaluation import match_points  # noqa: E402
from mk_hspc.models.segmenters.classical import ClassicalSegmenter  # noqa: E402
from mk_hspc.models.segmenters.nuclei import HspcParams  # noqa: E402

AUDIT_DIR = REPO / "bench" / "reference_audit"
SAMPLE_SIZES = {"bm_graz_unmatched_kept": 60, "bm_graz_unmatched_low": 60, "bm_graz_matched": 30}
CHALLENGE_SAMPLE_SIZE = 60
SEED = 20261130
BM_LABELS = ("nucleus", "not_nucleus", "unsure")
MERGED_LABELS = ("one_nucleus", "several_nuclei", "unsure")
TILE_PX = 160
BM_CROP_UM = 20.0
CHALLENGE_CROP_UM = 24.0
SAME_CANDIDATE_PX = 0.5  # a sample row and a recomputed candidate closer than this are the same


@dataclass(frozen=True)
class SampleRow:
    """One rated tile: where it is on the sheets, which group it was drawn from, and what it shows."""

    sheet: str
    tile: int
    group: str
    image: str
    x: float  # candidate centroid (BM_GRAZ) or true nucleus centroid (challenge), image px
    y: float
    score: float


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
    n_matched: int, n_unmatched_by_group: dict[str, int], fraction: dict[str, float]
) -> float:
    """Precision against the dots plus the estimated unannotated nuclei: each unmatched candidate of a group
    counts as ``fraction[group]`` of a true positive."""
    n = n_matched + sum(n_unmatched_by_group.values())
    if n == 0:
        return 0.0
    extra = sum(count * fraction[group] for group, count in n_unmatched_by_group.items())
    return (n_matched + extra) / n


@dataclass
class Domains:
    """Candidates and truth of BM_GRAZ (at its pixel size) and of the challenge, with each image's pixel size."""

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

    ``bm_graz_unmatched_kept``: at the default ``min_score``, kept and matched to no dot.
    ``bm_graz_unmatched_low``: below it, and matched to no dot even when every candidate is kept.
    ``bm_graz_matched``: kept at the default and matched to a dot (the control).
    """
    scores = domains.scores(candidates)
    default = np.flatnonzero(od.detected(candidates, scores, domains.params.min_score))
    _, _, _, pairs = match_points(candidates.xy[default], truth.xy, truth.gate_px)
    matched = np.zeros(len(default), bool)
    matched[pairs[:, 0]] = True
    index, matched_all = od.kept_and_matched(candidates, truth)
    low = scores[index] < domains.params.min_score
    return {
        "bm_graz_unmatched_kept": default[~matched],
        "bm_graz_unmatched_low": index[low & ~matched_all],
        "bm_graz_matched": default[matched],
    }


def merged_misses(domains: Domains, candidates: od.Candidates, truth: od.Truth) -> list[tuple[int, int]]:
    """``(true nucleus, candidate covering most of it)`` of each challenge nucleus lost as ``merged``."""
    scores = domains.scores(candidates)
    categories = od.miss_categories(candidates, truth, scores, domains.params)
    under = _candidate_labels_at_image_px(candidates, truth.labels.shape)
    out = []
    for k in np.flatnonzero(np.asarray(categories) == "merged"):
        cover = np.bincount(under[truth.labels == k + 1], minlength=len(candidates.kept) + 1)
        cover[0] = 0
        out.append((int(k), int(cover.argmax()) - 1))
    return out


def _candidate_labels_at_image_px(candidates: od.Candidates, shape: tuple[int, int]) -> np.ndarray:
    f = candidates.factor
    return np.repeat(np.repeat(candidates.labels, f, axis=0), f, axis=1)[: shape[0], : shape[1]]


def draw_sample(domains: Domains) -> tuple[list[SampleRow], dict[tuple[str, int], tuple]]:
    """The seeded sample and, per ``(sheet, tile)``, what to draw: ``(candidates, truth, candidate, true)``."""
    rng = np.random.default_rng(SEED)
    pools: dict[str, list[tuple]] = {group: [] for group in SAMPLE_SIZES}
    for candidates, truth in domains.bm_graz:
        for group, index in bm_graz_groups(domains, candidates, truth).items():
            pools[group] += [(candidates, truth, int(i), None) for i in index]
    bm_tiles = []
    for group, size in SAMPLE_SIZES.items():
        chosen = rng.choice(len(pools[group]), min(size, len(pools[group])), replace=False)
        bm_tiles += [(group, pools[group][j]) for j in sorted(chosen)]
    bm_tiles = [bm_tiles[j] for j in rng.permutation(len(bm_tiles))]  # blind: groups mixed
    merged = [
        (candidates, truth, c, k)
        for candidates, truth in domains.challenge
        for k, c in merged_misses(domains, candidates, truth)
    ]
    chosen = sorted(rng.choice(len(merged), min(CHALLENGE_SAMPLE_SIZE, len(merged)), replace=False))
    challenge_tiles = [("challenge_merged", merged[j]) for j in chosen]
    rows, drawing = [], {}
    for prefix, per_sheet, tiles in (("bm", 30, bm_tiles), ("challenge", 15, challenge_tiles)):
        for n, (group, item) in enumerate(tiles):
            candidates, truth, c, k = item
            sheet, tile = f"{prefix}_{n // per_sheet + 1}", n % per_sheet + 1
            x, y = candidates.xy[c] if k is None else truth.xy[k]
            score = float(domains.scores(candidates)[c])
            rows.append(
                SampleRow(
                    sheet, tile, group, truth.name, round(float(x), 2), round(float(y), 2), round(score, 4)
                )
            )
            drawing[(sheet, tile)] = item
    return rows, drawing


def render_tile(candidates: od.Candidates, truth: od.Truth, c: int, k: int | None) -> np.ndarray:
    """A BM_GRAZ tile (20 µm, the candidate outlined) or a challenge pair (24 µm: candidate | reference)."""
    import cv2

    pixel_um = od.GATE_UM / truth.gate_px
    crop_um = BM_CROP_UM if k is None else CHALLENGE_CROP_UM
    half = int(round(crop_um / pixel_um / 2))
    cx, cy = (int(round(v)) for v in (candidates.xy[c] if k is None else truth.xy[k]))
    under = _candidate_labels_at_image_px(candidates, candidates.rgb.shape[:2])

    def window(image: np.ndarray, fill: int) -> np.ndarray:
        padded = np.pad(
            image, ((half, half), (half, half)) + ((0, 0),) * (image.ndim - 2), constant_values=fill
        )
        return np.ascontiguousarray(padded[cy : cy + 2 * half, cx : cx + 2 * half])

    def outlined(mask: np.ndarray, colour: tuple[int, int, int], base: np.ndarray) -> np.ndarray:
        small = cv2.resize(mask.astype(np.uint8), (TILE_PX, TILE_PX), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        return cv2.drawContours(base, contours, -1, colour, 1)

    rgb = cv2.resize(window(candidates.rgb[..., :3], 255), (TILE_PX, TILE_PX), interpolation=cv2.INTER_CUBIC)
    left = outlined(window(under, 0) == c + 1, (0, 220, 0), rgb.copy())
    if k is None:
        return left
    reference = window(truth.labels, 0)
    right = rgb.copy()
    for value in np.unique(reference[reference > 0]):
        right = outlined(reference == value, (255, 220, 0), right)
    return np.hstack([left, np.full((TILE_PX, 4, 3), 255, np.uint8), right])


def write_sheets(rows: list[SampleRow], drawing: dict, folder: Path) -> None:
    """One PNG per sheet: numbered tiles, 6 (BM_GRAZ) or 3 (challenge pairs) per row."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for sheet in sorted({row.sheet for row in rows}):
        tiles = []
        for row in (r for r in rows if r.sheet == sheet):
            image = render_tile(*drawing[(sheet, row.tile)])
            header = np.full((18, image.shape[1], 3), 255, np.uint8)
            cv2.putText(
                header, str(row.tile), (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA
            )
            tiles.append(np.pad(np.vstack([header, image]), ((0, 6), (0, 6), (0, 0)), constant_values=255))
        columns = 6 if sheet.startswith("bm") else 3
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
        grid = np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])
        cv2.imwrite(str(folder / f"{sheet}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


SAMPLE_FIELDS = ("sheet", "tile", "group", "image", "x", "y", "score")


def write_sample(rows: list[SampleRow], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, SAMPLE_FIELDS)
        writer.writeheader()
        writer.writerows({field: getattr(row, field) for field in SAMPLE_FIELDS} for row in rows)


def read_sample(path: Path) -> list[SampleRow]:
    with path.open(newline="") as handle:
        return [
            SampleRow(
                r["sheet"],
                int(r["tile"]),
                r["group"],
                r["image"],
                float(r["x"]),
                float(r["y"]),
                float(r["score"]),
            )
            for r in csv.DictReader(handle)
        ]


def read_labels(path: Path, rows: list[SampleRow]) -> dict[tuple[str, int], str]:
    """One rater's ``sheet,tile,label`` file, checked: every tile rated once with a label its sheet allows."""
    allowed = {
        (row.sheet, row.tile): BM_LABELS if row.sheet.startswith("bm") else MERGED_LABELS for row in rows
    }
    labels: dict[tuple[str, int], str] = {}
    with path.open(newline="") as handle:
        for line, r in enumerate(csv.DictReader(handle), start=2):
            key = (r["sheet"], int(r["tile"]))
            if key not in allowed:
                raise ValueError(f"{path}:{line}: no tile {key[1]} on sheet {key[0]!r} in the sample")
            if r["label"] not in allowed[key]:
                raise ValueError(f"{path}:{line}: label {r['label']!r} is not one of {allowed[key]}")
            if key in labels:
                raise ValueError(f"{path}:{line}: tile {key[1]} of sheet {key[0]!r} is rated twice")
            labels[key] = r["label"]
    missing = sorted(set(allowed) - set(labels))
    if missing:
        raise ValueError(f"{path}: {len(missing)} tiles are not rated, first {missing[0]}")
    return labels


class StaleSampleError(RuntimeError):
    """The audit sample no longer matches the candidates of the current code."""


def check_sample(rows: list[SampleRow], domains: Domains) -> None:
    """Every sampled tile must still be the same candidate in the same group (or the same merged miss)."""
    current: dict[tuple[str, str], np.ndarray] = {}
    for candidates, truth in domains.bm_graz:
        for group, index in bm_graz_groups(domains, candidates, truth).items():
            current[(truth.name, group)] = candidates.xy[index]
    for candidates, truth in domains.challenge:
        current[(truth.name, "challenge_merged")] = truth.xy[
            [k for k, _ in merged_misses(domains, candidates, truth)]
        ]
    for row in rows:
        points = current.get((row.image, row.group), np.zeros((0, 2)))
        if not len(points) or np.min(np.hypot(*(points - [row.x, row.y]).T)) > SAME_CANDIDATE_PX:
            raise StaleSampleError(
                f"{AUDIT_DIR / 'sample.csv'}: sheet {row.sheet} tile {row.tile} ({row.group} at {row.x}, {row.y} in "
                f"{row.image}) is no longer in its group with this code; draw a new sample (--sample) and rate it"
            )


def proportion(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {
        "n": n,
        "count": successes,
        "fraction": round(successes / n, 3) if n else None,
        "ci95": [round(low, 3), round(high, 3)],
    }


def rater_summary(rows: list[SampleRow], raters: dict[str, dict[tuple[str, int], str]]) -> dict:
    """Per group: the consensus fraction (nucleus / one nucleus) and each rater's; kappa per pair of raters."""
    out: dict = {"raters": sorted(raters), "groups": {}, "kappa": {}}
    for group in [*SAMPLE_SIZES, "challenge_merged"]:
        allowed = MERGED_LABELS if group == "challenge_merged" else BM_LABELS
        positive = allowed[0]
        keys = [(r.sheet, r.tile) for r in rows if r.group == group]
        agreed = sum(consensus([labels[key] for labels in raters.values()], positive) for key in keys)
        out["groups"][group] = {
            "consensus": proportion(agreed, len(keys)),
            "per_rater": {
                name: {label: sum(labels[key] == label for key in keys) for label in allowed}
                for name, labels in raters.items()
            },
        }
    names = sorted(raters)
    for domain in ("bm", "challenge"):
        keys = [(r.sheet, r.tile) for r in rows if r.sheet.startswith(domain)]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                kappa = cohen_kappa([raters[a][k] for k in keys], [raters[b][k] for k in keys])
                out["kappa"][f"{domain}: {a} vs {b}"] = None if kappa is None else round(kappa, 3)
    return out


def precision_sweep(domains: Domains, fraction: dict[str, float]) -> list[dict]:
    """BM_GRAZ precision against the dots and audited, and challenge recall, along ``min_score``."""
    import dataclasses

    default = domains.params.min_score
    out = []
    for min_score in real_tissue.SCORE_GRID[:9]:
        dots, audited, recall = [], [], []
        for candidates, truth in domains.bm_graz:
            scores = domains.scores(candidates)
            index = np.flatnonzero(od.detected(candidates, scores, min_score))
            _, _, _, pairs = match_points(candidates.xy[index], truth.xy, truth.gate_px)
            unmatched = np.setdiff1d(np.arange(len(index)), pairs[:, 0])
            high = int(np.sum(scores[index[unmatched]] >= default))
            by_group = {"bm_graz_unmatched_kept": high, "bm_graz_unmatched_low": len(unmatched) - high}
            dots.append(len(pairs) / len(index) if len(index) else 0.0)
            audited.append(audited_precision(len(pairs), by_group, fraction))
        p = dataclasses.replace(domains.params, min_score=min_score)
        corrected = []
        for candidates, truth in domains.challenge:
            names = od.miss_categories(candidates, truth, domains.scores(candidates), p)
            found, merged = names.count("found"), names.count("merged")
            recall.append(found / len(names))
            corrected.append(found / (len(names) - fraction["challenge_merged"] * merged))
        out.append(
            {
                "min_score": min_score,
                "bm_graz_precision_vs_dots": round(float(np.mean(dots)), 4),
                "bm_graz_precision_audited": round(float(np.mean(audited)), 4),
                "offdomain_recall_vs_reference": round(float(np.mean(recall)), 4),
                "offdomain_recall_one_nucleus_once": round(float(np.mean(corrected)), 4),
            }
        )
    return out


def measure(shared: Path, folder: Path) -> dict:
    rows = read_sample(folder / "sample.csv")
    raters = {
        path.stem.removeprefix("labels_"): read_labels(path, rows)
        for path in sorted(folder.glob("labels_*.csv"))
    }
    if not raters:
        raise FileNotFoundError(f"{folder}: no labels_<rater>.csv; rate the sheets first")
    domains = load_domains(shared)
    check_sample(rows, domains)
    summary = rater_summary(rows, raters)
    fraction = {
        group: summary["groups"][group]["consensus"]["fraction"] or 0.0 for group in summary["groups"]
    }
    return {
        "seed": SEED,
        "default_min_score": domains.params.min_score,
        "sample": summary,
        "sweep": precision_sweep(domains, fraction),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--folder", type=Path, default=AUDIT_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reference_audit.json")
    parser.add_argument("--sample", action="store_true", help="draw the sample and write the rating sheets")
    args = parser.parse_args()
    if args.sample:
        rows, drawing = draw_sample(load_domains(args.shared))
        args.folder.mkdir(parents=True, exist_ok=True)
        write_sample(rows, args.folder / "sample.csv")
        write_sheets(rows, drawing, args.folder / "sheets")
        print(f"{len(rows)} tiles on {len({r.sheet for r in rows})} sheets in {args.folder / 'sheets'}")
        return
    result = measure(args.shared, args.folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({g: v["consensus"] for g, v in result["sample"]["groups"].items()}, indent=2))
    print(json.dumps(result["sample"]["kappa"], indent=2))
    print(json.dumps(result["sweep"], indent=2))


if __name__ == "__main__":
    main()
