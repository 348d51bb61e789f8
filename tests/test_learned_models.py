"""Learned-model plugins (SAM2, Cellpose, ResNet-50, SAM2 embedding), offline and on the CPU.

Every model is a small randomly initialised network saved to a checkpoint in a temporary folder and
loaded back through the plugin's own loading code; nothing is downloaded. Results are compared with
the libraries' own reference paths run on the same network and input.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from mk_hspc.engine.plugins import build_plugins
from mk_hspc.models import create_feature_extractor, create_segmenter
from mk_hspc.models.features.resnet import (
    ResNet50Features,
    build_resnet50_trunk,
    crop_cells,
    normalised_tile,
)
from mk_hspc.models.features.sam2_embedding import Sam2EmbeddingFeatures, pool_embedding
from mk_hspc.models.sam2_backbone import WHOLE_TILE_FEATURES, load_sam2_model
from mk_hspc.models.segmenters.cellpose_seg import CellposeSegmenter, filter_and_relabel
from mk_hspc.models.segmenters.sam2_amg import Sam2Segmenter
from mk_hspc.models.tile_memo import tile_fingerprint
from mk_hspc.models.torch_device import resolve_device

SAM2_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM2_TEST_IMAGE_SIZE = 128  # SAM2 input size for the tests (1024 for real checkpoints): 64x cheaper
TILE_PX = 256
# AMG settings for the random network: thresholds low enough that masks survive, but every filter
# (predicted IoU, stability, crop edges, both NMS steps over 1 + 4 crops) still removes some.
SAM2_TEST_AMG = {
    "points_per_side": 5,
    "pred_iou_thresh": 0.47,
    "stability_score_thresh": 0.02,
    "stability_score_offset": 0.2,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 1,
    "min_mask_region_area": 0,
}


@pytest.fixture(scope="module", autouse=True)
def _two_torch_threads():
    """The test machine has 2 shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def disc_tile(size: int = TILE_PX) -> np.ndarray:
    """White tile with five soft purple discs (H&E-like colours)."""
    yy, xx = np.mgrid[:size, :size]
    tile = np.full((size, size, 3), 235, np.uint8)
    for cy, cx, r in [
        (0.2, 0.2, 0.1),
        (0.62, 0.4, 0.12),
        (0.3, 0.75, 0.08),
        (0.8, 0.8, 0.1),
        (0.8, 0.15, 0.08),
    ]:
        tile[(yy - cy * size) ** 2 + (xx - cx * size) ** 2 < (r * size) ** 2] = (130, 50, 150)
    return ndi.gaussian_filter(tile.astype(float), (3, 3, 0)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# SAM2
# --------------------------------------------------------------------------------------------------


def _make_random_decoder_image_driven(model: torch.nn.Module) -> None:
    """Random SAM2 weights give near-zero logits with a checkerboard from the transposed convolutions,
    i.e. one whole-tile mask. Amplifying the mask logits and tying the transposed-conv taps (nearest
    upsampling) gives many image-dependent masks of varied size, so the comparison has something to
    compare. The network stays a plain SAM2 checkpoint."""
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
        for layer in model.sam_mask_decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(layer.weight[..., :1, :1].expand_as(layer.weight))


@pytest.fixture(scope="module")
def sam2_tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random SAM2.1 hiera-tiny saved as a checkpoint, and the in-memory model it was saved from."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    overrides = [f"++model.image_size={SAM2_TEST_IMAGE_SIZE}"]
    model = build_sam2(SAM2_TINY_CONFIG, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    _make_random_decoder_image_driven(model)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model


@pytest.fixture(scope="module")
def sam2_reference_masks(sam2_tiny) -> list[dict]:
    """SAM2's own ``SAM2AutomaticMaskGenerator`` on the disc tile."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    _, model = sam2_tiny
    generator = SAM2AutomaticMaskGenerator(model, **SAM2_TEST_AMG)
    # SAM2ImagePredictor assumes a 1024 px input when reshaping encoder features.
    s = SAM2_TEST_IMAGE_SIZE
    generator.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return generator.generate(disc_tile())


def _sam2_segmenter(checkpoint: Path, **params) -> Sam2Segmenter:
    return create_segmenter(
        "sam2",
        checkpoint=str(checkpoint),
        config=SAM2_TINY_CONFIG,
        device="cpu",
        image_size=SAM2_TEST_IMAGE_SIZE,
        **{**SAM2_TEST_AMG, **params},
    )


def _full_masks(proposals, shape: tuple[int, int]) -> list[np.ndarray]:
    masks = []
    for y0, x0, window in proposals.full_res_masks(budget_px=5000):  # several chunks
        mask = np.zeros(shape, bool)
        mask[y0 : y0 + window.shape[0], x0 : x0 + window.shape[1]] = window
        masks.append(mask)
    return masks


def test_sam2_masks_equal_sam2_automatic_mask_generator(sam2_tiny, sam2_reference_masks):
    """Without an area range, the windowed generator keeps exactly SAM2's masks (pixel for pixel, with
    the same predicted IoU, stability score and box); SAM2's empty masks are never kept."""
    checkpoint, _ = sam2_tiny
    tile = disc_tile()
    reference = [record for record in sam2_reference_masks if record["area"] > 0]
    assert len(reference) >= 10, "the test network must produce a meaningful number of masks"

    proposals = _sam2_segmenter(checkpoint, min_area_um2=0.0, max_area_um2=1e12).propose(tile, 1.0)
    ours = _full_masks(proposals, tile.shape[:2])

    assert len(ours) == len(reference)
    unmatched = list(range(len(ours)))
    for record in reference:
        match = next((i for i in unmatched if np.array_equal(ours[i], record["segmentation"])), None)
        assert match is not None, f"SAM2 mask with bbox {record['bbox']} missing"
        unmatched.remove(match)
        assert int(proposals.areas[match]) == record["area"]
        assert float(proposals.predicted_iou[match]) == pytest.approx(record["predicted_iou"], abs=1e-6)
        assert float(proposals.stability_score[match]) == pytest.approx(record["stability_score"], abs=1e-6)
        x, y, w, h = record["bbox"]
        assert proposals.boxes[match].tolist() == [x, y, x + w, y + h]


def test_windowed_upsampling_equals_sam2_whole_crop_upsampling():
    """The claim behind the windowed generator, at up- and down-sampling crop sizes: bilinear
    upsampling of the low-res logits (SAM2's ``F.interpolate`` of the whole crop) is positive only
    inside the mask's window, and the windowed values reproduce it there."""
    import torch.nn.functional as F

    from mk_hspc.models.segmenters.sam2_amg import logit_windows, sample_windows

    generator = torch.Generator().manual_seed(0)
    low_res = F.avg_pool2d(torch.randn(6, 1, 20, 20, generator=generator), 5, 1, 2)[:, 0] * 4 - 1
    low_res[5] = -1.0  # an empty mask
    crop_boxes = torch.tensor(
        [
            [0, 0, 300, 200],
            [37, 11, 120, 97],
            [5, 5, 15, 12],
            [100, 50, 1100, 1050],
            [0, 0, 64, 64],
            [3, 3, 50, 50],
        ]
    )
    windows = logit_windows(low_res > 0, crop_boxes)
    values, valid = sample_windows(low_res, crop_boxes, windows)
    assert (
        valid[5].sum() == 0 and (F.interpolate(low_res[5][None, None], (47, 47), mode="bilinear") <= 0).all()
    )
    positive_px = 0
    for i, (x0, y0, x1, y1) in enumerate(crop_boxes.tolist()[:5]):
        whole = F.interpolate(
            low_res[i][None, None], (y1 - y0, x1 - x0), mode="bilinear", align_corners=False
        )[0, 0]
        tile = torch.zeros(1100, 1100, dtype=torch.bool)
        tile[y0:y1, x0:x1] = whole > 0
        wy0, wy1, wx0, wx1 = windows[i].tolist()
        assert tile[wy0:wy1, wx0:wx1].sum() == tile.sum()  # nothing positive outside the window
        ours = (values[i] > 0) & valid[i]
        assert torch.equal(ours[: wy1 - wy0, : wx1 - wx0], tile[wy0:wy1, wx0:wx1])
        positive_px += int(tile.sum())
    assert positive_px > 1000  # the masks are not trivially empty


def test_sam2_segment_gives_one_label_image_within_the_area_range(sam2_tiny):
    pixel_size_um = 0.5
    min_area_um2, max_area_um2 = 10.0, 2000.0  # 40 .. 8000 px
    segmenter = _sam2_segmenter(
        sam2_tiny[0],
        min_area_um2=min_area_um2,
        max_area_um2=max_area_um2,
        min_unclaimed_fraction=0.5,
        crop_n_layers=0,  # crops are covered by the exact comparison above
    )
    tile = disc_tile()
    proposals = segmenter.propose(tile, pixel_size_um)
    areas_um2 = np.array([m.sum() for m in _full_masks(proposals, tile.shape[:2])]) * pixel_size_um**2
    assert len(proposals) >= 3
    assert np.all((areas_um2 >= min_area_um2) & (areas_um2 <= max_area_um2))
    assert np.array_equal(areas_um2, proposals.areas.numpy() * pixel_size_um**2)

    result = segmenter.segment(tile, pixel_size_um)

    assert result.labels.shape == tile.shape[:2] and result.labels.dtype == np.int32
    assert result.n_cells >= 1
    assert np.array_equal(np.unique(result.labels), np.arange(result.n_cells + 1))
    label_areas_um2 = np.bincount(result.labels.ravel())[1:] * pixel_size_um**2
    assert np.all(label_areas_um2 >= min_area_um2) and np.all(label_areas_um2 <= max_area_um2)
    # Painted best-first: label k has the k-th highest predicted IoU among the kept masks.
    assert np.all(np.diff(result.scores) <= 0)
    assert set(np.round(result.scores, 6)) <= set(np.round(proposals.predicted_iou.numpy(), 6))


def test_sam2_embedding_equals_manual_mask_pooling_of_the_encoder_output(sam2_tiny):
    """Mask-weighted mean of SAM2ImagePredictor's image embedding under each cell; the model is shared
    with the segmenter and the segmenter's encoding of the same tile is reused unchanged."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    checkpoint, _ = sam2_tiny
    tile = disc_tile()
    labels = np.zeros(tile.shape[:2], np.int32)
    labels[40:90, 30:70] = 1
    labels[150:160, 200:250] = 2
    labels[100:101, 100:101] = 3  # a single pixel
    cell_labels = np.array([2, 1, 3, 9])  # 9 is absent

    extractor = create_feature_extractor(
        "sam2_embedding",
        checkpoint=str(checkpoint),
        config=SAM2_TINY_CONFIG,
        device="cpu",
        image_size=SAM2_TEST_IMAGE_SIZE,
        reuse_segmenter_encoding=False,
    )
    features = extractor.extract(tile, labels, cell_labels, 0.5)

    model = load_sam2_model(SAM2_TINY_CONFIG, checkpoint, torch.device("cpu"), SAM2_TEST_IMAGE_SIZE)
    predictor = SAM2ImagePredictor(model)
    s = SAM2_TEST_IMAGE_SIZE
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor.set_image(tile)
    embedding = predictor.get_image_embedding()[0].numpy()  # (256, 8, 8): 32x32 tile px per cell
    grid = embedding.shape[1]
    block = TILE_PX // grid
    expected = []
    for label in cell_labels:
        weights = (labels == label).reshape(grid, block, grid, block).sum(axis=(1, 3)).astype(float)
        expected.append((embedding * weights).sum(axis=(1, 2)) / weights.sum() if weights.sum() else None)

    assert list(features.columns) == [f"sam2_embedding_{i:03d}" for i in range(256)]
    assert features.shape == (4, 256) and (features.dtypes == np.float32).all()
    for row, vector in enumerate(expected):
        if vector is None:
            assert features.iloc[row].isna().all()
        else:
            np.testing.assert_allclose(features.iloc[row].to_numpy(), vector, rtol=1e-4, atol=1e-5)

    segmenter = _sam2_segmenter(checkpoint, crop_n_layers=0, points_per_side=2)  # only needs the encoding
    assert segmenter.generator.model is extractor.model  # one encoder in memory
    segmenter.propose(tile, 0.5)
    assert WHOLE_TILE_FEATURES.get(id(extractor.model), tile_fingerprint(tile)) is not None
    extractor.reuse_segmenter_encoding = True
    np.testing.assert_allclose(extractor.tile_embedding(tile), embedding, rtol=1e-5, atol=1e-6)


def test_pool_embedding_weights_embedding_cells_by_mask_pixels():
    embedding = np.arange(2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2)  # (C, Gh, Gw)
    labels = np.zeros((4, 4), np.int32)
    labels[0, 0:3] = 5  # 2 px in embedding cell (0, 0), 1 px in cell (0, 1)
    pooled = pool_embedding(embedding, labels, np.array([5, 6]))
    np.testing.assert_allclose(pooled[0], (2 * embedding[:, 0, 0] + embedding[:, 0, 1]) / 3)
    assert np.isnan(pooled[1]).all()


def test_sam2_missing_checkpoint_or_unknown_config_raise_clear_errors(tmp_path, sam2_tiny):
    missing = tmp_path / "sam2.1_hiera_large.pt"
    for make in (Sam2Segmenter, Sam2EmbeddingFeatures):
        with pytest.raises(FileNotFoundError, match="sam2.1_hiera_large.pt"):
            make(checkpoint=str(missing), device="cpu")
    with pytest.raises(ValueError, match="Unknown SAM2 config"):
        Sam2Segmenter(checkpoint=str(sam2_tiny[0]), config="configs/sam2.1/no_such.yaml", device="cpu")


# --------------------------------------------------------------------------------------------------
# Cellpose
# --------------------------------------------------------------------------------------------------


class _SmallSam:
    """Stands in for ``segment_anything``'s ViT-L builder: same ``ImageEncoderViT`` class, 1 block of
    width 32, so Cellpose's real ``CPSAM`` network runs in seconds on a CPU."""

    def __init__(self, checkpoint=None) -> None:
        from segment_anything.modeling import ImageEncoderViT

        self.image_encoder = ImageEncoderViT(
            depth=1,
            embed_dim=32,
            img_size=1024,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=1,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[0],
            window_size=14,
            out_chans=32,
        )


@pytest.fixture
def small_cpsam(tmp_path, monkeypatch) -> Path:
    """A random small CP-SAM saved like Cellpose saves models. The monkeypatch stays on for the test so
    that ``CellposeModel`` builds the same small architecture before loading the file."""
    import cellpose.vit

    monkeypatch.setitem(cellpose.vit.sam_model_registry, "vit_l", _SmallSam)
    torch.manual_seed(0)
    path = tmp_path / "cpsam"
    cellpose.vit.CPSAM().save_model(path)
    return path


def cellpose_tile() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:TILE_PX, :TILE_PX]
    tile = np.full((TILE_PX, TILE_PX, 3), 230, np.uint8)
    for cy, cx in rng.uniform(20, TILE_PX - 20, (12, 2)):
        tile[(yy - cy) ** 2 + (xx - cx) ** 2 < 12**2] = (80, 30, 120)
    return tile


def test_cellpose_segment_equals_direct_cellpose_eval(small_cpsam):
    from cellpose import models

    pixel_size_um, diameter_um = 0.5, 12.0  # 24 px cells
    params = {"flow_threshold": 0.0, "cellprob_threshold": 0.0, "tile_overlap": 0.1, "batch_size": 4}
    segmenter = create_segmenter(
        "cellpose",
        weights=str(small_cpsam),
        device="cpu",
        diameter_um=diameter_um,
        min_area_um2=2.0,
        max_area_um2=50.0,
        **params,
    )
    tile = cellpose_tile()
    result = segmenter.segment(tile, pixel_size_um)

    direct = models.CellposeModel(gpu=False, pretrained_model=str(small_cpsam), use_bfloat16=False)
    masks, flows, _ = direct.eval(tile, channel_axis=-1, diameter=24.0, min_size=8, **params)
    expected = filter_and_relabel(masks, 8, 200)  # 2 .. 50 µm² at 0.5 µm/px

    assert result.n_cells > 0
    np.testing.assert_array_equal(result.labels, expected)
    probability = 1 / (1 + np.exp(-flows[2]))
    expected_scores = [probability[expected == k].mean() for k in range(1, result.n_cells + 1)]
    np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-5)
    areas_um2 = np.bincount(result.labels.ravel())[1:] * pixel_size_um**2
    assert areas_um2.min() >= 2.0 and areas_um2.max() <= 50.0


def test_cellpose_never_downloads_a_missing_model(tmp_path, small_cpsam, monkeypatch):
    import cellpose.models

    def no_download(*args, **kwargs):
        raise AssertionError("Cellpose tried to download a model")

    monkeypatch.setattr(cellpose.models, "cache_model_path", no_download)
    for weights in ("cpsam", str(tmp_path / "missing" / "cpsam")):  # a Cellpose model name, a path
        with pytest.raises(FileNotFoundError, match="cpsam"):
            CellposeSegmenter(weights=weights, device="cpu")
    segmenter = CellposeSegmenter(weights=str(small_cpsam), device="cpu")
    small_cpsam.unlink()  # weights vanish before the lazy load
    with pytest.raises(FileNotFoundError, match=str(small_cpsam.name)):
        segmenter.segment(cellpose_tile(), 0.5)


# --------------------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory) -> Path:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet50_random.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    return path


def test_resnet50_features_equal_direct_torchvision_forward_of_the_crops(resnet50_weights):
    from torchvision.models import resnet50

    tile = np.random.default_rng(1).integers(0, 256, (TILE_PX, TILE_PX, 3), dtype=np.uint8)
    labels = np.zeros(tile.shape[:2], np.int32)
    labels[100:164, 60:124] = 1  # 64 x 64 bbox -> 128 px crop at context 0.5 -> exact 2x2 means
    labels[20:40, 180:250] = 2
    labels[230:256, 230:256] = 3  # at the tile corner: crop reaches outside
    cell_labels = np.array([3, 1, 8, 2])  # 8 is absent
    extractor = create_feature_extractor(
        "resnet50",
        weights=str(resnet50_weights),
        device="cpu",
        crop_size_px=64,
        context_fraction=0.5,
        batch_size=2,
    )
    features = extractor.extract(tile, labels, cell_labels, 0.5)

    assert list(features.columns) == [f"resnet50_{i:04d}" for i in range(2048)]
    assert features.shape == (4, 2048) and (features.dtypes == np.float32).all()
    assert features.iloc[2].isna().all() and features.drop(index=2).notna().all().all()

    boxes = extractor.crop_boxes(labels, cell_labels, 0.5)
    np.testing.assert_array_equal(boxes[1], [28, 68, 156, 196])
    crops = crop_cells(normalised_tile(tile, torch.device("cpu")), boxes[[0, 1, 3]], 64)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    window = (tile[68:196, 28:156].transpose(2, 0, 1) / 255 - mean) / std
    np.testing.assert_allclose(crops[1].numpy(), window.reshape(3, 64, 2, 64, 2).mean(axis=(2, 4)), atol=1e-5)

    network = resnet50(weights=None)
    network.load_state_dict(torch.load(resnet50_weights, weights_only=True))
    network.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = network.eval()(crops).numpy()
    np.testing.assert_allclose(features.iloc[[0, 1, 3]].to_numpy(), expected, rtol=1e-4, atol=1e-5)


def test_resnet50_missing_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet50.pth"):
        ResNet50Features(weights=str(tmp_path / "resnet50.pth"), device="cpu")
    with pytest.raises(FileNotFoundError, match="resnet50.pth"):
        build_resnet50_trunk(tmp_path / "resnet50.pth")


# --------------------------------------------------------------------------------------------------
# No-op segmenter and device choice
# --------------------------------------------------------------------------------------------------


def test_noop_segmenter_returns_an_empty_label_image():
    result = create_segmenter("noop").segment(np.zeros((30, 40, 3), np.uint8), 0.2)
    assert result.labels.shape == (30, 40) and result.labels.dtype == np.int32
    assert result.n_cells == 0 and not result.labels.any()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_gpu_environment_parameters_build_the_learned_plugins(tmp_path):
    """Every plugin ``conf/gpu`` selects accepts its parameters from ``conf/base`` (weights paths swapped for
    stand-in files; the models load lazily, so nothing is read)."""
    from tests.test_parameters import load_parameters

    segmentation = load_parameters(env="gpu")["segmentation"]
    stand_in = tmp_path / "weights.bin"
    stand_in.write_bytes(b"stand-in, never read")
    for params in [
        *(spec["params"][spec["name"]] for spec in segmentation["segmenters"].values()),
        *(spec["params"] for spec in segmentation["features"].values()),
    ]:
        params.update({key: str(stand_in) for key in ("checkpoint", "weights") if key in params})

    segmenters, extractors = build_plugins({**segmentation, "device": "cpu"})
    built = [*segmenters.values(), *extractors]
    assert [plugin.name for plugin in built] == [
        "sam2",
        "cellpose",
        "morphology",
        "sam2_embedding",
        "resnet50",
    ]
    assert all(plugin.device == torch.device("cpu") for plugin in built if hasattr(plugin, "device"))
    assert built[0].settings.points_per_side == 24 and built[0].config == "configs/sam2.1/sam2.1_hiera_l.yaml"
