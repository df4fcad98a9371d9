"""Ranking cost and agreement on the bundled demo: CLIP, perplexity and combined, side by side.

Rerun with::

    PYTHONPATH=. python benchmarks/ranking.py              # about 1.5 minutes on a 2-core CPU
    PYTHONPATH=. python benchmarks/ranking.py --prompts 2  # a smoke run

(``PYTHONPATH=.`` runs this checkout's package rather than an installed one.)

For each of ``--prompts`` seen captions (shapes.sample_scene, split "train", rng seed 0) it generates
``--candidates`` candidates (seed 0, top_k = the whole image vocabulary, top_p 0.995), then ranks them
with ``rudalle_pipe.rerank`` by each method and prints, from this one run:

* the time of one ranking of the set (best of 3; perplexity needs no CLIP forward pass), and its ratio
  to CLIP's;
* how often each method's top-1 is CLIP's top-1 and perplexity's top-1 (agreement, not quality: the
  quality comparison with the attribute detector is in benchmarks/demo_quality.py).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from rudalle_pipe import rerank, shapes
from rudalle_pipe.generation import generate_images
from rudalle_pipe.pipeline import load_pipeline


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=16)
    args = parser.parse_args()
    pipe = load_pipeline("demo", upscaler=False)
    rng = random.Random(0)
    captions = [shapes.caption(shapes.sample_scene(rng, "train")) for _ in range(args.prompts)]
    vocab = pipe.dalle.config.image_vocab_size
    times = {"clip": [], "perplexity": [], "combined": []}
    top1 = {by: [] for by in times}
    for caption in captions:
        gen = generate_images(caption, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=vocab, top_p=0.995,
                              num_images=args.candidates, seed=0, progress=False)
        kwargs = {"clip": dict(clip=pipe.clip), "perplexity": dict(perplexities=gen.perplexities),
                  "combined": dict(clip=pipe.clip, perplexities=gen.perplexities)}
        for by in times:
            def once(by=by):
                return rerank(gen.images, caption, by=by, progress=False, **kwargs[by])
            top1[by].append(once().indices[0])
            times[by].append(best_of(once))
    n = len(captions)
    clip_time = sum(times["clip"]) / n
    print(f"demo, {n} seen captions x {args.candidates} candidates (seed 0), {torch.get_num_threads()} threads")
    print(f"{'by':<11} {'ms/ranking':>10} {'vs clip':>9} {'top1=clip':>10} {'top1=ppl':>9}")
    for by in times:
        ms = 1000 * sum(times[by]) / n
        same_clip = sum(a == b for a, b in zip(top1[by], top1["clip"]))
        same_ppl = sum(a == b for a, b in zip(top1[by], top1["perplexity"]))
        print(f"{by:<11} {ms:>10.2f} {ms / 1000 / clip_time:>8.4f}x {same_clip:>6}/{n:<3} {same_ppl:>5}/{n:<3}")


if __name__ == "__main__":
    main()
