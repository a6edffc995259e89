"""Run under torchrun by tests/test_hf.py: the tiny GPT-2 run of ``_hf`` on CPU processes
(gloo), each taking its share of the 16 examples of every step."""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import _hf  # noqa: E402

out = Path(sys.argv[1])
world = int(os.environ["WORLD_SIZE"])
callback = _hf.polca(out / "polca.zarr", k=1, max_basis=2, hessian_data=_hf.batches(16, 8, seed=2))
_hf.train(out / "trainer", 8, [callback], batch=16 // world, ddp_backend="gloo")
