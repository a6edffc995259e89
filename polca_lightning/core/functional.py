"""Parameters as one flat vector, and the token loss as a pure function of it.

Everything POLCA computes is a function of the flat vector ``theta`` ``[d]`` that
concatenates the *selected* parameters in ``named_parameters()`` order. The rest of
the model (unselected parameters, buffers) is held fixed.

The loss is evaluated through :func:`torch.func.functional_call` on a small wrapper
whose forward calls ``token_loss(inner, batch)``: the substituted parameters reach every
submodule for the duration of the call, whatever the token loss calls on the module.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from polca_lightning.core.losses import TokenLoss, check_token_loss_output

__all__ = ["ParameterSpace", "evaluation_mode", "FunctionalTokenLoss"]


@dataclass(frozen=True)
class ParameterSpace:
    """The selected parameters of a module, flattened in ``named_parameters()`` order.

    Attributes:
        names: parameter names, in order.
        shapes: their shapes.
        dim: total number of scalars ``d``.

    Example:
        >>> space = ParameterSpace.from_module(nn.Linear(3, 2))
        >>> space.dim, space.names
        (8, ('weight', 'bias'))
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.numels)

    @classmethod
    def from_module(cls, module: nn.Module, include: Sequence[str] | None = None) -> "ParameterSpace":
        """Select parameters by exact name or shell-style pattern (``"blocks.0.*"``).

        Raises:
            ValueError: a pattern that matches no trainable parameter, or nothing selected.
        """
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if include is None:
            chosen = named
        else:
            if isinstance(include, str):
                include = [include]
            for pattern in include:
                if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                    raise ValueError(
                        f"parameters: {pattern!r} matches no trainable parameter; the model has "
                        f"{[n for n, _ in named][:20]}{' ...' if len(named) > 20 else ''}"
                    )
            chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in include)]
        if not chosen:
            raise ValueError("parameters: no trainable parameters selected")
        return cls(tuple(n for n, _ in chosen), tuple(tuple(p.shape) for _, p in chosen))

    @classmethod
    def of_store(cls, module: nn.Module, ds, what: str) -> "ParameterSpace":
        """The module's parameters that a store (``open_store`` Dataset) was written over.

        Raises:
            ValueError: a store without weight snapshots, or parameters that are not the
                module's; ``what`` names the computation that needs them.
        """
        if "weights" not in ds:
            raise ValueError(f"store: it holds no weight snapshots; {what} needs them")
        names = [name for name, _ in ds.attrs["parameters"]]
        space = cls.from_module(module, names)
        if list(space.names) != names or space.dim != ds.sizes["param"]:
            raise ValueError(f"module: its parameters do not match the store's ({names[:3]}...)")
        return space

    def flatten(self, module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
        """The current values of the selected parameters as one detached vector ``[d]``."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to(dtype or params[n].dtype) for n in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of ``theta`` ``[d]`` shaped as each parameter (differentiable)."""
        if theta.dim() != 1 or theta.shape[0] != self.dim:
            raise ValueError(f"expected a flat parameter vector of length {self.dim}, got shape {list(theta.shape)}")
        pieces = torch.split(theta, self.numels)
        return {n: piece.view(shape) for n, piece, shape in zip(self.names, pieces, self.shapes)}

    def describe(self) -> list[list]:
        """``[[name, shape], ...]``, as stored in the ``parameters`` attribute."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]


def _layer_norm_decomposed(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` in elementary ops: the same values, correct to every order of AD."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).pow(2).mean(dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@contextlib.contextmanager
def _quiet(context) -> Iterator[None]:
    """``context``, without the notice torch gives on CPU builds when oneDNN flags change (about TF32)."""
    def silenced(call):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            return call()

    silenced(context.__enter__)
    try:
        yield
    finally:
        silenced(lambda: context.__exit__(None, None, None))


@contextlib.contextmanager
def evaluation_mode(module: nn.Module, second_order: bool = False) -> Iterator[None]:
    """Eval mode with every kernel forward-mode AD and double backward can go through.

    Attention on the math SDPA backend, ``nn.MultiheadAttention``'s and the transformer
    layers' fast path off, oneDNN RNN kernels off, autocast off (mixed-precision training
    leaves the parameters in float32, and so are the numbers computed here), compiled code
    run eagerly. The module's
    train/eval mode (of every submodule) is restored on exit.
    """
    modes = [(m, m.training) for m in module.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the fused RNN kernels (oneDNN on CPU, cuDNN on GPU) have no forward-mode AD; turning
    # them off globally would also slow convolutions, so only for models with an RNN
    has_rnn = any(isinstance(m, nn.RNNBase) for m in module.modules())
    layer_norm = torch.nn.functional.layer_norm
    try:
        if second_order:
            torch.nn.functional.layer_norm = _layer_norm_decomposed
        module.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            for device_type in {"cpu", *(p.device.type for p in module.parameters())}:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            if hasattr(torch.compiler, "set_stance"):
                # a torch.compile'd model runs eagerly here: the same numbers, without a recompile for
                # every batch shape (a batch of one), forward hook or transform the engines use
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            if has_rnn:
                stack.enter_context(_quiet(torch.backends.mkldnn.flags(enabled=False)))
                stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            yield
    finally:
        torch.nn.functional.layer_norm = layer_norm
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes:
            m.training = training


class _TokenLossCall(nn.Module):
    """Wrapper whose forward is ``token_loss(inner, batch)``, so functional_call reaches every submodule."""

    def __init__(self, inner: nn.Module, token_loss: TokenLoss):
        super().__init__()
        self.inner = inner
        self._token_loss = token_loss

    def forward(self, batch: Any) -> Any:
        return self._token_loss(self.inner, batch)


class FunctionalTokenLoss:
    """``theta [d] -> (loss [B, P], mask [B, P], target)`` for one module and token loss.

    Args:
        module: the user's module (its selected parameters are replaced by ``theta``).
        token_loss: the token-loss contract (see :mod:`polca_lightning.core.losses`).
        space: the selected parameters.
    """

    def __init__(self, module: nn.Module, token_loss: TokenLoss, space: ParameterSpace):
        self.module = module
        self.space = space
        self._wrapper = _TokenLossCall(module, token_loss)

    def __call__(self, theta: Tensor, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        params = {"inner." + n: p for n, p in self.space.unflatten(theta).items()}
        out = torch.func.functional_call(self._wrapper, params, (batch,), strict=False)
        return check_token_loss_output(out)

    def mean_loss_hvp(self, theta: Tensor, batches: Sequence[Any], n_tokens: int | None = None):
        """Hessian-vector product of the mean token loss over ``batches`` at ``theta``.

        Double backward per batch, no graph kept between calls. ``n_tokens``: the token
        count to divide by (default: counted here; a distributed caller passes the global
        count and all-reduces the result).

        Returns:
            ``hvp(v [d]) -> H v [d]``.
        """
        if n_tokens is None:
            with torch.no_grad():
                n_tokens = sum(int(self(theta, b)[1].sum()) for b in batches)
        if n_tokens == 0:
            raise ValueError("hessian_data: every token is masked; the Hessian of the mean loss is undefined")

        def hvp(v: Tensor) -> Tensor:
            out = torch.zeros_like(theta)
            with torch.enable_grad():
                for batch in batches:
                    t = theta.detach().requires_grad_(True)
                    loss, mask, _ = self(t, batch)
                    total = loss[mask].sum() / n_tokens
                    (grad,) = torch.autograd.grad(total, t, create_graph=True)
                    (hv,) = torch.autograd.grad(grad, t, grad_outputs=v.to(grad.dtype))
                    out += hv.detach()
            return out

        return hvp
