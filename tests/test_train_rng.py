"""Training leaves the caller's global random generators as they were (issue: set_seed reseeded them)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")

from rudalle_pipe.train.common import LoopConfig, keep_global_rng, run_training  # noqa: E402


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_training_does_not_reseed_the_callers_generators(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    want = draws()  # what the caller's streams give next, had nothing run
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    _, losses = run_training("rng", model, lambda m, batch: m(batch).pow(2).mean(), lambda step, shard: x,
                             LoopConfig(steps=3, seed=7, checkpoint_every=3, log_every=1), tmp_path, progress=False)
    assert len(losses) == 3
    assert draws() == want  # set_seed(7) inside did not leak out
    with pytest.raises(RuntimeError, match="boom"):  # an exception restores them too
        with keep_global_rng():
            torch.manual_seed(0)
            raise RuntimeError("boom")
