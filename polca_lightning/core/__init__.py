"""The torch math of POLCA, importing nothing else of the package.

- ``losses``: the token-loss contract and the built-in token losses.
- ``functional``: the selected parameters as one flat vector, the loss as a function of it,
  evaluation mode.
- ``engine``: :class:`DirectionalDerivatives`, every probe token's directional derivatives
  along a set of directions (forward mode, or reverse mode through ``_ghost``, the
  activation path, and ``_jacobians``, per-sample Jacobians); ``_engine_errors`` explains a
  model neither can differentiate; ``_precision`` scopes TF32 and bf16.
- ``hessian``: the projected Lanczos eigensolver (Algorithm 1), with ``_streaming``'s
  chunked products and orthonormalisation for a basis kept off the device.
- ``polca``: the four orders and the coverage diagnostic.
"""
