"""POLCA (Projection Oriented Loss Change Allocation) for PyTorch Lightning.

Add :class:`POLCACallback` to a ``Trainer``; reload the store with :func:`open_store`.
"""

from polca_lightning.ablation import ablate_directions
from polca_lightning.callback import POLCACallback
from polca_lightning.engine import DirectionalDerivatives, EngineError
from polca_lightning.functional import ParameterSpace
from polca_lightning.hessian import EigenResult, projected_hessian_eigs
from polca_lightning.losses import causal_lm_token_loss, classifier_token_loss, masked_lm_token_loss
from polca_lightning.polca import ORDERS, coverage, polca_interval
from polca_lightning.store import StoreError, TokenIndex, open_store

__version__ = "0.1.0.dev0"

__all__ = [
    "POLCACallback",
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
