"""Worker of tests/test_distributed.py: train the tiny generator with ``run_training`` in however many
processes it was launched with (plain ``python``, ``torchrun`` or ``accelerate launch``) and let the main
process write the losses, the world size and the final weights to ``OUT/result.json`` and ``OUT/weights.pt``.

Usage: python dist_train_worker.py OUT BATCH_SIZE ACCUMULATION [GRAD_CLIP]  (GRAD_CLIP "none" turns clipping off)
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny.py

from tiny import tiny_dalle  # noqa: E402

from rudalle_pipe.dalle import DalleModel  # noqa: E402
from rudalle_pipe.train.common import LoopConfig, Shard, run_training  # noqa: E402

PAIRS, STEPS, SEED = 24, 6, 3


def main() -> None:
    out, batch_size, accumulation = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    clip = sys.argv[4] if len(sys.argv) > 4 else "1.0"
    base = tiny_dalle()
    torch.manual_seed(0)
    model = DalleModel(replace(base.config, dropout=0.0))  # no dropout: every process count sees the same net
    model.load_state_dict(base.state_dict())
    cfg = model.config
    text = torch.randint(1, cfg.vocab_size, (PAIRS, cfg.text_seq_length), generator=torch.Generator().manual_seed(1))
    codes = torch.randint(0, cfg.image_vocab_size, (PAIRS, cfg.image_tokens_per_dim ** 2),
                          generator=torch.Generator().manual_seed(2))
    ids = torch.cat([text, codes], dim=1)  # (PAIRS, T + h*w)

    def get_batch(step: int, shard: Shard) -> torch.Tensor:
        return ids[shard.indices(step, PAIRS, batch_size, SEED)]

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch, return_loss=True).loss

    config = LoopConfig(steps=STEPS, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=1, seed=SEED,
                        gradient_accumulation_steps=accumulation, grad_clip=None if clip == "none" else float(clip))
    # The key part of the attention bias has a zero gradient in exact arithmetic (softmax ignores a shift
    # shared by all keys), so its computed gradient is rounding noise that Adam scales up to +-lr steps whose
    # signs depend on the order of summation (one batch vs two shards averaged). It stays frozen here, so
    # the comparison is about the data-parallel loop, not about Adam on noise.
    params = [p for n, p in model.named_parameters() if not n.endswith("query_key_value.bias")]
    trained, losses = run_training("dist", model, loss_fn, get_batch, config, out / "run", parameters=params,
                                   progress=False)
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    state = PartialState()
    if state.is_main_process:
        torch.save(trained.state_dict(), out / "weights.pt")
        (out / "result.json").write_text(json.dumps({"world_size": state.num_processes, "losses": losses,
                                                     "distributed_type": AcceleratorState().distributed_type.value}))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
