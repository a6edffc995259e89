"""POLCA (Projection Oriented Loss Change Allocation) for PyTorch Lightning.

Add :class:`POLCACallback` to a Lightning ``Trainer``, or
:class:`polca_lightning.hf.POLCATrainerCallback` to Hugging Face's ``transformers.Trainer``
(the ``transformers`` extra; not imported here), or wrap a training loop written by hand in
``with`` :func:`track` ``(...)``, or run :func:`from_checkpoints` over the checkpoints a
run saved; reload the store with :func:`open_store`.

The package logs to the ``polca_lightning`` logger at INFO (each basis step, the engine
costs, where the report went), shown on stderr as Lightning shows its own when the
application has not configured logging; ``logging.getLogger("polca_lightning")
.setLevel(logging.WARNING)`` quiets it.
"""

import logging as _logging

_log = _logging.getLogger(__name__)
_log.setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():  # the application configured no logging: say it on stderr
    _log.addHandler(_logging.StreamHandler())
    _log.propagate = False

from polca_lightning.ablation import ablate_directions
from polca_lightning.config import POLCAConfig
from polca_lightning.core.engine import DirectionalDerivatives, EngineError
from polca_lightning.core.functional import ParameterSpace
from polca_lightning.core.hessian import EigenResult, projected_hessian_eigs
from polca_lightning.core.losses import causal_lm_token_loss, classifier_token_loss, masked_lm_token_loss
from polca_lightning.core.polca import ORDERS, coverage, polca_interval
from polca_lightning.loop import track
from polca_lightning.series import from_checkpoints
from polca_lightning.store import StoreError, TokenIndex, open_store

__version__ = "0.1.0.dev0"


def __getattr__(name: str):
    """``POLCACallback`` on first use: Lightning's import (seconds, torch.compile's machinery
    included) is paid by the programs that use the callback, not by the command line, the
    plain loop, the checkpoint series or a script that only reads a store."""
    if name == "POLCACallback":
        from polca_lightning.callback import POLCACallback

        return POLCACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

__all__ = [
    "POLCACallback",
    "track",
    "from_checkpoints",
    "POLCAConfig",
    "open_store",
    "StoreError",
    "TokenIndex",
    "DirectionalDerivatives",
    "EngineError",
    "ParameterSpace",
    "projected_hessian_eigs",
    "EigenResult",
    "causal_lm_token_loss",
    "classifier_token_loss",
    "masked_lm_token_loss",
    "polca_interval",
    "coverage",
    "ORDERS",
    "ablate_directions",
]
