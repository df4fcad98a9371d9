"""Does a batch-1 bf16 image gain from oneDNN's packed weights? Real images at Malevich shape, alternating.

Rerun with (about 5 minutes on a 2-core CPU, 24 GB of RAM)::

    python benchmarks/bf16_batch1_packing.py            # 2 rounds
    python benchmarks/bf16_batch1_packing.py --rounds 4

Builds a random Malevich-shaped generator (24 layers, hidden 2048) in bf16 and draws one 1024-token image
per round with packed weights (``backend.PACK_MIN_ROWS = 1``; the packing is made inside the timed call, as a
generation makes it) and one without (``PACK_MIN_ROWS = 2``, the shipped setting), alternating so that a
machine that slows down slows both. Prints each time and the ratio of the sums.
"""
from __future__ import annotations

import argparse
import time

import torch

from rudalle_pipe import backend
from rudalle_pipe.dalle import DalleConfig, DalleModel
from rudalle_pipe.sampling import sample_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DalleModel(DalleConfig()).eval().to(torch.bfloat16)
    text = torch.randint(1, 16000, (model.config.text_seq_length,))
    totals = {"packed": 0.0, "torch": 0.0}
    for round_ in range(args.rounds):
        for name, min_rows in (("packed", 1), ("torch", 2)):
            backend.PACK_MIN_ROWS = min_rows
            start = time.perf_counter()
            sample_codes(model, text, seeds=[round_], top_k=2048, top_p=0.995, batch_size=1, progress=False)
            seconds = time.perf_counter() - start
            totals[name] += seconds
            print(f"round {round_}: {name:6s} {seconds:.1f} s", flush=True)
    print(f"packed / torch's product, batch 1: {totals['packed'] / totals['torch']:.3f}")


if __name__ == "__main__":
    main()
