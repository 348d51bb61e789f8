"""GPU throughput of the learned plugins on full-size tiles: seconds per tile and GPU busy fraction.

Runs the ``sam2`` (hiera-L config) and ``cellpose`` (CP-SAM) segmenters and the ``resnet50`` and
``sam2_embedding`` feature extractors on synthetic H&E-like 3000 px tiles, with randomly initialised
weights saved to a temporary folder and loaded through the plugins' own loaders (this measures speed,
not accuracy: no weights are downloaded). The GPU busy fraction is NVML's "utilization.gpu" (share of
time at least one kernel ran), sampled every 100 ms while a model runs.

Writes ``bench/results/gpu.json``; on a machine without a CUDA GPU it writes
``{"gpu_available": false, "reason": ...}`` instead of numbers.

Usage: python bench/gpu_bench.py [--tiles N] [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "gpu.json"
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"


def synthetic_he_tile(size_px: int, pixel_size_um: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """H&E-like RGB tile (pink stroma, purple nuclei, a few large pale MK-like cells) and its cell labels."""
    rng = np.random.default_rng(seed)
    tile = np.empty((size_px, size_px, 3), np.uint8)
    tile[:] = (236, 200, 220)
    tile = np.clip(tile + rng.normal(0, 6, tile.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((size_px, size_px), np.int32)
    yy, xx = np.ogrid[:size_px, :size_px]
    n_small = int(size_px**2 * pixel_size_um**2 / 400)  # ~1 small cell per 400 µm²
    cells = [(r, (120, 60, 160)) for r in rng.uniform(3.0, 5.0, n_small) / pixel_size_um]
    cells += [(r, (215, 150, 200)) for r in rng.uniform(9.0, 20.0, 6) / pixel_size_um]  # MK-like
    for label, (radius, colour) in enumerate(cells, start=1):
        cy, cx = rng.uniform(radius, size_px - radius, 2)
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, size_px))
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, size_px))
        disc = (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 < radius**2
        tile[y0:y1, x0:x1][disc] = colour
        labels[y0:y1, x0:x1][disc] = label
    return tile, labels


class GpuBusySampler:
    """Samples NVML GPU utilisation (pynvml when installed, else ``nvidia-smi -lms``) in the background."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusySampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._thread = threading.Thread(target=self._poll_nvml, args=(pynvml, handle), daemon=True)
        except Exception:  # no pynvml: stream nvidia-smi instead
            if shutil.which("nvidia-smi") is None:
                return self
            self._process = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={torch.cuda.current_device()}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={int(self.period_s * 1000)}",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        self._thread.start()
        return self

    def _poll_nvml(self, pynvml: Any, handle: Any) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if self._stop.is_set():
                break
            if line.strip().isdigit():
                self.samples.append(int(line) / 100.0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def busy_fraction(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def save_random_weights(folder: Path) -> dict[str, Path]:
    """Random SAM2 hiera-L, CP-SAM and ResNet-50 checkpoints in the formats the plugins load."""
    import cellpose.vit
    from sam2.build_sam import build_sam2
    from torchvision.models import resnet50

    torch.manual_seed(0)
    paths = {"sam2": folder / "sam2.1_hiera_large_random.pt", "cellpose": folder / "cpsam_random"}
    paths["resnet50"] = folder / "resnet50_random.pth"
    torch.save({"model": build_sam2(SAM2_CONFIG, ckpt_path=None, device="cpu").state_dict()}, paths["sam2"])
    cellpose.vit.CPSAM().save_model(paths["cellpose"])
    torch.save(resnet50(weights=None).state_dict(), paths["resnet50"])
    return paths


def time_model(run: Any, tiles: list[tuple[np.ndarray, np.ndarray]], warmup: int) -> dict[str, Any]:
    """Run ``run(tile, labels)`` on every tile after ``warmup`` untimed calls; s/tile and GPU busy share."""
    for tile, labels in tiles[:warmup]:
        run(tile, labels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds, outputs = [], []
    with GpuBusySampler() as sampler:
        for tile, labels in tiles:
            start = time.perf_counter()
            outputs.append(run(tile, labels))
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return {
        "s_per_tile": float(np.mean(seconds)),
        "s_per_tile_each": [round(s, 4) for s in seconds],
        "gpu_busy_fraction": sampler.busy_fraction,
        "gpu_busy_samples": len(sampler.samples),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "outputs": outputs,
    }


def benchmark(n_tiles: int, tile_px: int, pixel_size_um: float, warmup: int) -> dict[str, Any]:
    from mk_hspc.models import create_feature_extractor, create_segmenter

    tiles = [synthetic_he_tile(tile_px, pixel_size_um, seed) for seed in range(n_tiles)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = save_random_weights(Path(folder))
        sam2 = create_segmenter("sam2", checkpoint=str(weights["sam2"]), config=SAM2_CONFIG, device="cuda")
        cellpose = create_segmenter(
            "cellpose", weights=str(weights["cellpose"]), device="cuda", batch_size=64
        )
        resnet = create_feature_extractor("resnet50", weights=str(weights["resnet50"]), device="cuda")
        embedding = create_feature_extractor(
            "sam2_embedding",
            checkpoint=str(weights["sam2"]),
            config=SAM2_CONFIG,
            device="cuda",
            reuse_segmenter_encoding=False,  # measure the encoder, not the cache
        )

        def features(extractor: Any) -> Any:
            return lambda tile, labels: extractor.extract(tile, labels, np.unique(labels)[1:], pixel_size_um)

        runs = {
            "sam2": lambda tile, labels: sam2.segment(tile, pixel_size_um).n_cells,
            "cellpose": lambda tile, labels: cellpose.segment(tile, pixel_size_um).n_cells,
            "resnet50": lambda tile, labels: len(features(resnet)(tile, labels)),
            "sam2_embedding": lambda tile, labels: len(features(embedding)(tile, labels)),
        }
        for name, run in runs.items():
            timing = time_model(run, tiles, warmup)
            outputs = timing.pop("outputs")
            key = (
                "cells_described_per_tile"
                if name in ("resnet50", "sam2_embedding")
                else "masks_kept_per_tile"
            )
            results[name] = {**timing, key: outputs}
            print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=5, help="timed tiles per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed tiles first (cuDNN autotune, caches)")
    parser.add_argument("--tile-px", type=int, default=3000)
    parser.add_argument("--pixel-size-um", type=float, default=0.1725)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    report: dict[str, Any] = {
        "benchmark": "learned plugins on synthetic H&E-like tiles, random weights (speed only)",
        "tile_px": args.tile_px,
        "pixel_size_um": args.pixel_size_um,
        "tiles": args.tiles,
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "host": platform.node(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if not torch.cuda.is_available():
        report |= {
            "gpu_available": False,
            "reason": "torch.cuda.is_available() is False on this machine: no CUDA GPU or driver visible, "
            "so no GPU timings were measured. Run `python bench/gpu_bench.py` on a CUDA machine.",
        }
    else:
        report |= {"gpu_available": True, "device": torch.cuda.get_device_name()}
        report["models"] = benchmark(args.tiles, args.tile_px, args.pixel_size_um, args.warmup)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
