"""What "same seed, same image" means on this device, and how far fp16/bf16 drift from fp32.

Rerun (``benchmarks/gpu_check.sh`` runs it on a GPU machine; on a CPU it runs too, as a reference)::

    python benchmarks/gpu_semantics.py --json gpu_semantics.json

With the bundled demo (trained weights, so codes have real margins), 8 prompts x 4 seeds, guidance 2:

1. batch-size invariance: the codes at batch 32 (all images in one batch) against batch 1, 3 and 8, per
   dtype and decoder: the share of images that are identical and of positions that agree;
2. repeatability: the same call twice at the same batch size (share of identical images);
3. greedy drift: fp16 and bf16 greedy codes (top_k=1) against fp32 greedy codes on this device, free
   running (a first difference changes everything after it) and teacher-forced (arg-max per position
   on fp32's sequence).
"""
from __future__ import annotations

import argparse
import json

import torch

from rudalle_pipe.files import atomic_write
from rudalle_pipe import generate_images
from rudalle_pipe.pipeline import load_pipeline
from rudalle_pipe.tokenizer import prepare_text

PROMPTS = ["красный круг", "синий квадрат", "зелёный треугольник на белом фоне", "жёлтая звезда",
           "красный квадрат на синем фоне", "синий круг слева", "зелёная звезда в центре", "жёлтый ромб"]


def codes(pipe, *, batch_size: int, decoder: str, **kw) -> torch.Tensor:
    kw = dict(dict(top_k=32, top_p=0.99, num_images=4, seed=0, guidance_scale=2.0), **kw)
    return generate_images(PROMPTS, pipe.tokenizer, pipe.dalle, pipe.vae, batch_size=batch_size, decoder=decoder,
                           progress=False, **kw).codes


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"images_identical": (a == b).all(1).float().mean().item(), "positions_agree": (a == b).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch_size": {},
                     "repeat": {}, "greedy": {}}
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    for name in args.dtypes:
        dtype = dtypes[name]
        pipe = load_pipeline("demo", clip=False, upscaler=False, device=device, dtype=dtype)
        for decoder in ("dynamic", "static"):
            ref = codes(pipe, batch_size=32, decoder=decoder)
            again = codes(pipe, batch_size=32, decoder=decoder)
            results["repeat"][f"{name}/{decoder}"] = agreement(ref, again)
            for bs in (1, 3, 8):
                cell = agreement(ref, codes(pipe, batch_size=bs, decoder=decoder))
                results["batch_size"][f"{name}/{decoder}/batch{bs}-vs-32"] = cell
                print(f"{name:8s} {decoder:7s} batch {bs} vs 32: {cell['images_identical']:.0%} images identical, "
                      f"{cell['positions_agree']:.1%} positions agree", flush=True)
            print(f"{name:8s} {decoder:7s} same call twice: "
                  f"{results['repeat'][f'{name}/{decoder}']['images_identical']:.0%} images identical", flush=True)
    greedy = dict(top_k=1, top_p=1.0, num_images=1, guidance_scale=1.0)
    base = load_pipeline("demo", clip=False, upscaler=False, device=device)
    want = codes(base, batch_size=8, decoder="auto", **greedy)
    T = base.dalle.config.text_seq_length
    text = torch.stack([base.tokenizer.encode_text(prepare_text(t), T) for t in PROMPTS]).to(device)
    with torch.inference_mode():
        ref_logits = base.dalle(torch.cat((text, want.to(device)), 1), image_logits_only=True).logits[:, T - 1 : -1]
    for name in [n for n in args.dtypes if n != "float32"]:
        pipe = load_pipeline("demo", clip=False, upscaler=False, device=device, dtype=dtypes[name])
        got = codes(pipe, batch_size=8, decoder="auto", **greedy)
        with torch.inference_mode():
            logits = pipe.dalle(torch.cat((text, want.to(device)), 1), image_logits_only=True).logits[:, T - 1 : -1]
        forced = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        results["greedy"][name] = dict(agreement(want, got), teacher_forced_argmax_agree=forced)
        print(f"greedy {name} vs float32: free-running {results['greedy'][name]['positions_agree']:.1%} positions "
              f"({results['greedy'][name]['images_identical']:.0%} images), teacher-forced {forced:.1%}", flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
