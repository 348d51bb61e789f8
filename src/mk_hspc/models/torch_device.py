"""Device choice and inference settings shared by the learned (torch) plugins.

Every learned plugin takes a ``device`` parameter (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) and runs
its forward passes inside :func:`inference_context`, so the GPU settings (bf16 autocast, TF32 matmuls)
are decided in one place and CPU runs stay in exact float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from mk_hspc.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """Turn the ``device`` parameter into a torch device.

    ``auto`` picks the first CUDA GPU when one is visible, else the CPU. Asking for ``cuda`` on a
    machine without one is a configuration error, raised here rather than deep inside a run.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES} (or 'cuda:N'), got {device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but no CUDA GPU is available")
    return torch.device(name)


def enable_tf32(device: torch.device) -> None:
    """Allow TF32 matmuls/convolutions on CUDA (Ampere+): ~2x faster float32 work at ~1e-3 precision,
    which is far below what segmentation or embedding features can resolve."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(device: torch.device, use_bfloat16: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``device``: bf16 on CUDA GPUs that support it, else ``None`` (float32).

    CPU bf16 is slow on most machines and would make CPU results differ from the reference models.
    """
    if use_bfloat16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def inference_context(device: torch.device, use_bfloat16: bool = True) -> Iterator[None]:
    """``torch.inference_mode`` plus bf16 autocast where :func:`autocast_dtype` allows it."""
    dtype = autocast_dtype(device, use_bfloat16)
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


class WeightsNotFoundError(UserError, FileNotFoundError):
    """A configured weights file does not exist (weights are never downloaded)."""


class WeightsFileError(UserError, ValueError):
    """A configured weights file exists but cannot be weights (empty)."""


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a ``Path`` or raise ``FileNotFoundError`` naming it.

    Model weights are never downloaded: a missing file is a configuration error that must say which
    path was configured, not a silent fetch or a default model.
    """
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise WeightsNotFoundError(
            f"{what} not found at {str(resolved)!r} (absolute: {str(resolved.resolve())!r}). Weights are "
            "never downloaded: put the file there or point the parameter at a local copy."
        )
    if resolved.stat().st_size == 0:
        raise WeightsFileError(
            f"{what} at {str(resolved)!r} is an empty file (0 bytes; an interrupted copy?); "
            "copy the real weights there"
        )
    return resolved
