"""What went wrong when an engine could not differentiate a model, said so that the user can act.

:func:`engine_error` turns the errors of the engines that failed into one
:class:`EngineError` naming the op (from torch's message, or the ``autograd.Function``
that raised), the line of the user's code that calls it, and what to change.
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["EngineError"]


class EngineError(RuntimeError):
    """Neither engine could differentiate the model; the message says which op and what to change."""


def is_ad_gap(err: BaseException) -> bool:
    """Errors that mean "this engine cannot differentiate an op", not a user bug."""
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(
        s in text
        for s in (
            "forward ad",
            "forward-mode",
            "not implemented",
            "batching rule",
            "vmap",
            "double backward",
            "derivative for",
            "does not support",
            "setup_context",
        )
    )


_OP_PATTERNS = (
    r"derivative for '([\w.:]+)'",  # no derivative at all
    r"forward AD with ([\w.:]+)",  # no forward-mode derivative
    r"atching rule not implemented for ([\w.:]+)",
)
_LIBRARY_DIRS = (  # frames in these are not the user's code
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


def failing_op(err: BaseException) -> str | None:
    """The op an AD error is about: named by torch's message, or the autograd.Function that raised."""
    for pattern in _OP_PATTERNS:
        match = re.search(pattern, str(err))
        if match:
            return match.group(1)
    tb, name = err.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        cls = frame.f_locals.get("cls") if frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            name = f"{cls.__name__} (a torch.autograd.Function)"
        tb = tb.tb_next
    return name


def user_frame(err: BaseException) -> str | None:
    """``file:line (function)`` of the innermost frame outside torch and polca_lightning."""
    tb, where = err.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        path = os.path.abspath(code.co_filename)
        if not path.startswith(_LIBRARY_DIRS) and not code.co_filename.startswith("<"):
            where = f"{code.co_filename}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    return where


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def engine_error(errors: dict[str, BaseException], fixed: str | None) -> EngineError:
    """One error for every engine that failed: the op, where the model calls it, what to change."""
    parts, advice = [], []
    for name, err in errors.items():
        op, where = failing_op(err), user_frame(err)
        loc = ", ".join(x for x in (op and f"op {op}", where and f"called at {where}") if x)
        parts.append(f"{name} mode: {first_line(err)}" + (f" [{loc}]" if loc else ""))
        text = str(err)
        if "setup_context" in text:
            advice.append("give the autograd.Function a setup_context and a jvp (torch.func support, "
                          "https://pytorch.org/docs/stable/notes/extending.func.html)")
        elif "forward AD" in text or "forward-mode" in text:
            advice.append("write the op in plain torch for forward mode (fused attention: the math backend; "
                          "Hugging Face models: attn_implementation=\"eager\")")
        elif "derivative for" in text:
            advice.append(f"replace {op or 'the op'}, which has no derivative in torch, by differentiable ops, or "
                          "select only parameters after it with parameters=")
    if not advice:
        advice.append("fused attention kernels and some fused layers have no forward-mode AD or double backward: "
                      "use attention on the math backend (Hugging Face models: attn_implementation=\"eager\"), "
                      "or write the op in plain torch")
    if fixed is not None:
        advice.append(f"or pass engine='auto' instead of engine={fixed!r}")
    unique = list(dict.fromkeys(advice))
    return EngineError(
        "cannot compute directional derivatives of this model (" + "; ".join(parts) + "). To change: "
        + "; ".join(unique)
    )
