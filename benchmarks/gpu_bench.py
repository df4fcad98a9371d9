"""GPU decoding speed at Malevich shape, against the original rudalle 1.1.3 on the same GPU and weights.

Rerun on a CUDA machine (``benchmarks/gpu_check.sh`` runs it with the GPU tests, in about 5 minutes)::

    python benchmarks/gpu_bench.py --reference-src DIR --json gpu_bench.json

``DIR`` holds the original package's source (the folder that contains ``rudalle/``; unpack the
``rudalle==1.1.3`` wheel there). Without ``--reference-src`` the original's column is skipped. Only its
model file is imported (the package's ``__init__`` would pull in its tokenizer and VQGAN dependencies).
``--small`` swaps in a 2-layer, hidden-256 config so the script can be tried on a CPU.

Measured in one run, random weights (speed does not depend on their values), fp16:

1. per-step time of one decoding position at batch 1, 8 and 32, at image positions 0, 256, 512 and
   1023 (the cache filled to that length first), for: ours with the plain cached step
   (``decoder="dynamic"``), ours with the fixed-shape step replayed as a CUDA graph (``"static"``),
   and the original's cached step (its ``generate_images`` loop body: the forward on the sequence so far
   with its cache). Each cell is the median of ``--reps`` timed calls after warm-up, with CUDA events.
2. whole-image tokens/s projected from a line fitted through those four positions (sum over the 1024
   positions), and the ratios ours/original.
3. one real full-image ``sample_codes`` run per decoder at batch 8 (sampling included), as a check of
   the projection.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types

import torch

from rudalle_pipe.files import atomic_write
from rudalle_pipe import DalleConfig, DalleModel
from rudalle_pipe.sampling import sample_codes
from rudalle_pipe.static_decode import StaticDecoder

from scale import project_s  # benchmarks/scale.py: seconds over all positions from a fitted line

MALEVICH_ORIGINAL = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, embedding_dropout_prob=0.1,
                         output_dropout_prob=0.1, attention_dropout_prob=0.1, image_tokens_per_dim=32,
                         text_seq_length=128, cogview_sandwich_layernorm=True, cogview_pb_relax=True,
                         vocab_size=16384 + 128, image_vocab_size=8192)


def load_original(src: str):
    """The original ``DalleModel`` class from ``src/rudalle/dalle/model.py``, without running the package
    ``__init__`` files (stand-in package modules point the imports at the source folders)."""
    for name, sub in (("rudalle", ""), ("rudalle.dalle", "dalle")):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(src, "rudalle", sub)]
        sys.modules[name] = module
    from rudalle.dalle.model import DalleModel as Original

    return Original


class Timer:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup``, timed with CUDA events
    (or ``perf_counter`` on CPU). ``reset()`` runs untimed before each call."""

    def __init__(self, device: torch.device, reps: int, warmup: int = 2) -> None:
        self.cuda, self.reps, self.warmup = device.type == "cuda", reps, warmup

    def __call__(self, fn, reset=lambda: None) -> float:
        times = []
        for i in range(self.warmup + self.reps):
            reset()
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                elapsed = start.elapsed_time(stop)
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - t0) * 1e3
            if i >= self.warmup:
                times.append(elapsed)
        return statistics.median(times)


def ours_step_ms(model: DalleModel, ids: torch.Tensor, position: int, timer: Timer, static: bool) -> float:
    """One cached step at image ``position`` for ``ids [B, 128 + 1024]`` (text then codes)."""
    cfg = model.config
    cache = model.init_cache(ids.shape[0])
    model(ids[:, : cfg.text_seq_length + position], past_key_values=cache, use_cache=True,
          image_logits_only=True, last_only=True)
    length = cache.length
    token = ids[:, cfg.text_seq_length + position]

    def reset():
        cache.length = length

    if static:
        step = StaticDecoder(model, cache)
        ms = timer(lambda: step(token), reset)
    else:
        ms = timer(lambda: model(token[:, None], past_key_values=cache, use_cache=True,
                                 image_logits_only=True, last_only=True), reset)
    del cache
    return ms


def original_step_ms(model, ids: torch.Tensor, position: int, timer: Timer) -> float:
    """The original loop's step: forward on the sequence so far with a cache of everything before."""
    S = model.total_seq_length
    mask = torch.tril(torch.ones((ids.shape[0], 1, S, S), device=ids.device))
    upto = model.text_seq_length + position
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=ids.device.type == "cuda")
    with amp:  # its pb-relax softmax returns fp32 probabilities; autocast pairs them with fp16 values
        _, cache = model(ids[:, :upto], mask, use_cache=True, cache=None, return_loss=False)
        ms = timer(lambda: model(ids[:, : upto + 1], mask, use_cache=True, cache=dict(cache), return_loss=False))
    del cache, mask
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-src", help="folder holding the original rudalle/ source; omit to skip it")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 256, 512, 1023])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="2 layers, hidden 256 (a CPU smoke run)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shape = dict(num_layers=2, hidden_size=256) if args.small else {}
    torch.manual_seed(0)
    with torch.device(device):
        ours = DalleModel(DalleConfig(**shape)).to(dtype).eval()
    cfg = ours.config
    original = None
    if args.reference_src:
        params = dict(MALEVICH_ORIGINAL, **shape)
        with torch.device(device):
            original = load_original(args.reference_src)(device=device, **params).eval()
        original = original.half() if dtype == torch.float16 else original  # its .to() would take a dtype for a device
        missing, unexpected = original.load_state_dict(ours.state_dict(), strict=False)
        if [k for k in missing if not k.endswith("_mask")] or unexpected:
            raise SystemExit(f"weights did not line up: missing {missing}, unexpected {unexpected}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    print(f"# {name}; torch {torch.__version__}; {sum(p.numel() for p in ours.parameters()) / 1e9:.2f}B "
          f"parameters, {dtype}; median of {args.reps} steps per cell (ms)")
    timer = Timer(device, args.reps)
    g = torch.Generator(device=device).manual_seed(0)
    results = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "steps_ms": {}, "tokens_per_s": {}}
    columns = ["dynamic", "static"] + (["original"] if original is not None else [])
    with torch.inference_mode():
        for B in args.batches:
            text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (B, cfg.text_seq_length), device=device, generator=g)
            codes = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_seq_length), device=device, generator=g)
            ids = torch.cat((text, codes), 1)
            cells = {c: {} for c in columns}
            for P in args.positions:
                cells["dynamic"][P] = ours_step_ms(ours, ids, P, timer, static=False)
                cells["static"][P] = ours_step_ms(ours, ids, P, timer, static=True)
                if original is not None:
                    cells["original"][P] = original_step_ms(original, ids, P, timer)
                print(f"batch {B:2d} position {P:4d}: " + "  ".join(f"{c} {cells[c][P]:7.2f}" for c in columns),
                      flush=True)
            tps = {c: B * cfg.image_seq_length / project_s(cells[c], cfg.image_seq_length) for c in columns}
            results["steps_ms"][B], results["tokens_per_s"][B] = cells, tps
            line = "  ".join(f"{c} {tps[c]:8.1f}" for c in columns)
            if original is not None:
                line += f"  | static/original {tps['static'] / tps['original']:.1f}x" \
                        f"  dynamic/original {tps['dynamic'] / tps['original']:.1f}x"
            print(f"batch {B:2d} projected whole-image tokens/s: {line}  | static/dynamic "
                  f"{tps['static'] / tps['dynamic']:.2f}x", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        B = 8
        text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (cfg.text_seq_length,), device=device, generator=g)
        results["full_run_tokens_per_s"] = {}
        for decoder in ("dynamic", "static"):
            sample_codes(ours, text, seeds=list(range(B)), top_k=1024, top_p=0.99, batch_size=B, progress=False,
                         decoder=decoder, forced_codes=codes[0], forced_mask=torch.arange(cfg.image_seq_length) < 1000)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample_codes(ours, text, seeds=list(range(B)), top_k=1024, top_p=0.99, batch_size=B, progress=False,
                         decoder=decoder)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            results["full_run_tokens_per_s"][decoder] = B * cfg.image_seq_length / seconds
            print(f"full image, batch {B}, {decoder}: {seconds:.2f} s, "
                  f"{B * cfg.image_seq_length / seconds:.1f} tokens/s (sampling included)", flush=True)
    if device.type == "cuda":
        results["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
