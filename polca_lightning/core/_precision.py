"""The arithmetic the directional derivatives are computed in (``compute_precision``).

- ``"float32"`` (default): full float32. On CUDA, TF32 is switched off for matmuls and
  convolutions while the derivatives are computed, whatever the training script set
  (``torch.set_float32_matmul_precision("high")`` is common for training).
- ``"tf32"``: on CUDA, matmuls and convolutions of float32 tensors in TF32 (10-bit
  mantissa, float32 range) on GPUs that have it (Ampere and later). Without CUDA it is a
  no-op: CPU matmuls have no TF32 mode here, so the numbers are float32's.
- ``"bf16"``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` on CUDA and on CPU:
  the ops autocast lists (matmuls, linear layers, convolutions) in bfloat16, the rest
  (softmax, norms, losses) in float32.

The scope is entered inside :func:`~polca_lightning.core.functional.evaluation_mode` (which
turns the training run's autocast off) and everything it changes is restored on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("float32", "tf32", "bf16")


def check_compute_precision(value) -> str:
    """``value`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: anything else, naming the argument and the choices.
    """
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"compute_precision: expected one of {PRECISIONS}, got {value!r}")
    return value


def is_reduced(precision: str, device_type: str) -> bool:
    """Whether ``precision`` computes anything in less than float32 on ``device_type``."""
    return precision == "bf16" or (precision == "tf32" and device_type == "cuda")


@contextlib.contextmanager
def cuda_tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions on or off, restored on exit (whichever API this torch has)."""
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        # torch >= 2.9: the per-backend API; mixing it with allow_tf32 is an error there
        saved = (matmul.fp32_precision, conv.fp32_precision)
        value = "tf32" if enabled else "ieee"
        try:
            matmul.fp32_precision = conv.fp32_precision = value
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:
        saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:
            matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def precision_scope(precision: str, device_type: str) -> Iterator[None]:
    """Compute in ``precision`` on ``device_type`` (``"cpu"``, ``"cuda"``, ...) for the duration.

    Example:
        >>> with precision_scope("bf16", "cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    check_compute_precision(precision)
    with contextlib.ExitStack() as stack:
        if device_type == "cuda":
            stack.enter_context(cuda_tf32(precision == "tf32"))
        if precision == "bf16":
            stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        yield
