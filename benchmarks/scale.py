"""Decoding speed at Malevich shape on this CPU: fp32, bf16 and int8 weights, against the original rudalle.

Rerun with (about 6 minutes on a 2-core CPU, 24 GB of RAM; the original's column adds about 5)::

    python benchmarks/scale.py                                   # ours only
    python benchmarks/scale.py --reference-python ~/.cache/ref-venv/bin/python   # and rudalle 1.1.3
    python benchmarks/scale.py --full-run bf16                   # also real 1024-token images, one batch of each size

``--reference-python`` is an interpreter with the original package (``../shared/reference/make_ref_env.sh``
builds one); without it that column is skipped.

What one run does, all on the same random weights (speed does not depend on their values):

1. writes a Malevich-shaped generator (24 layers, hidden 2048, 1.3B parameters) in the original file layout
   (``torch.save`` of an fp16 state dict, masks under ``transformer.``) to a temporary folder, removed at the end;
2. for each format, in a fresh process: loads it through ``get_rudalle_model(checkpoint_path=...)`` (int8:
   then :func:`rudalle_pipe.quantize_int8`), records the peak RSS of loading, reads the memory bandwidth
   (best streaming read of 1 GiB), fills the key/value cache with random values up to image position 0, 256,
   512, 768 and 1023 and times the decoding steps that end there (median of ``--reps`` consecutive steps, after
   one more), at batch 1 and 8, with the decoder that ``generate_images`` picks for that format;
3. projects the whole image (1024 positions) from a line through those points, and compares each step with
   its bandwidth bound: the bytes it must read (weights of the blocks and of the image head, and the cache)
   over the bandwidth just measured;
4. with ``--reference-python``: the original's cached step on the same file in fp32 (its generation loop's
   body: the forward over the sequence so far with its cache), at the same positions and batches.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("fp32", "bf16", "bf16-unpacked", "int8")  # bf16-unpacked: bf16 without oneDNN's packed weights


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def median_ms(fn, reps: int, reset=lambda: None, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + reps):
        reset()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def project_s(points: dict, n: int) -> float:
    """Seconds for positions ``0..n-1`` from a least-squares line through ``{position: ms}``."""
    xs, ys = [int(x) for x in points], list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return sum(my + slope * (p - mx) for p in range(n)) / 1e3


def write_weights(path: str) -> None:
    """A random Malevich generator saved like the original file: fp16 state dict, bool masks."""
    import torch

    from rudalle_pipe import DalleConfig, DalleModel
    from rudalle_pipe.files import atomic_write

    torch.manual_seed(0)
    model = DalleModel(DalleConfig())
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


def worker(fmt: str, weights: str, batches: list, positions: list, reps: int, full_run: bool) -> dict:
    """One format in this process: load, then step times. Returns the results as a dict."""
    import torch

    from rudalle_pipe import get_rudalle_model
    from rudalle_pipe.quantize import quantize_int8
    from rudalle_pipe.sampling import decoding_threads, sample_codes
    from rudalle_pipe.static_decode import StaticDecoder, bucket_span, resolve_decoder

    from generation import read_bandwidth  # benchmarks/generation.py: best streaming read of 1 GiB

    start = time.perf_counter()
    dtype = torch.bfloat16 if fmt.startswith("bf16") else torch.float32
    model = get_rudalle_model("Malevich", checkpoint_path=weights, dtype=dtype)
    if fmt == "int8":
        quantize_int8(model)
    load_s, load_rss = time.perf_counter() - start, peak_rss_gb()
    cfg = model.config
    decoder = resolve_decoder("auto", model.device, True, model.dtype)
    # bytes one step reads: the blocks' weights and the image rows of the head (int8: 1 byte + scales)
    weight_bytes = sum(b.numel() * b.element_size() for n, b in model.transformer.layers.named_buffers())
    weight_bytes += sum(p.numel() * p.element_size() for p in model.transformer.layers.parameters())
    head = model.to_logits[1]
    head_w = head.weight[cfg.vocab_size:]
    weight_bytes += head_w.q.numel() + head_w.scales.numel() * 4 if fmt == "int8" else \
        head_w.numel() * head_w.element_size()
    kv_elt = torch.empty((), dtype=model.dtype).element_size()
    out = {"format": fmt, "decoder": decoder, "load_s": load_s, "load_peak_rss_gb": load_rss,
           "weight_bytes_per_step": weight_bytes, "steps_ms": {}, "roofline_ms": {}}
    bandwidth = read_bandwidth()
    out["bandwidth_gb_s"] = bandwidth / 1e9
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for B in batches:
            cache = model.init_cache(B)
            for k, v in zip(cache.keys, cache.values):
                k.normal_(0, 1, generator=gen), v.normal_(0, 1, generator=gen)
            token = torch.randint(0, cfg.image_vocab_size, (B,), generator=gen)
            step = StaticDecoder(model, cache) if decoder == "static" else None
            cells, bound = {}, {}
            for P in positions:
                length = cfg.text_offset + P
                # 1 + reps consecutive steps, as generation runs them, the last at P (the first at P when P < reps):
                # the static step keeps its contiguous copies of the span from one step to the next
                cache.length = cfg.text_offset + max(0, P - reps)
                with decoding_threads(model, B, packed=fmt != "bf16-unpacked"):  # as sample_codes selects it
                    if step is not None:
                        cells[P] = median_ms(lambda: step(token), reps)
                    else:
                        cells[P] = median_ms(lambda: model(token[:, None], past_key_values=cache, use_cache=True,
                                                           image_logits_only=True, last_only=True), reps)
                attended = bucket_span(length + 1, cfg.total_seq_length) if decoder == "static" \
                    else length + 1  # the static step without a graph spans whole buckets
                kv_bytes = 2 * cfg.num_layers * B * attended * cfg.hidden_size * kv_elt
                bound[P] = (weight_bytes + kv_bytes) / bandwidth * 1e3
                print(f"  {fmt} batch {B} position {P}: {cells[P]:.1f} ms (bound {bound[P]:.1f} ms)",
                      file=sys.stderr, flush=True)
            out["steps_ms"][B], out["roofline_ms"][B] = cells, bound
            del cache, step
        if full_run:  # real generation, as generate_images runs it: one batch of each size, 1024 codes per row
            text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (cfg.text_seq_length,), generator=gen)
            out["full_run_s"] = {}
            for B in batches:
                start = time.perf_counter()
                sample_codes(model, text, seeds=list(range(B)), top_k=2048, top_p=0.995, batch_size=B, progress=False)
                out["full_run_s"][B] = time.perf_counter() - start
                print(f"  {fmt} one real batch of {B}: {out['full_run_s'][B]:.1f} s", file=sys.stderr, flush=True)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def reference_worker(weights: str, batches: list, positions: list, reps: int, compat_dir: str) -> dict:
    """The original rudalle 1.1.3 on the same file, fp32, its cached step (run by --reference-python)."""
    sys.path.insert(0, compat_dir)
    from rudalle_compat import compat

    compat()
    import torch
    from rudalle.dalle import MODELS
    from rudalle.dalle.model import DalleModel

    start = time.perf_counter()
    model = DalleModel(device="cpu", **MODELS["Malevich"]["model_params"]).eval()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=False)
    del state
    out = {"format": "original fp32", "load_s": time.perf_counter() - start, "load_peak_rss_gb": peak_rss_gb(),
           "steps_ms": {}}
    S, T, C = model.total_seq_length, model.text_seq_length, 2048
    heads = 16
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B in batches:
            mask = torch.tril(torch.ones((B, 1, S, S)))
            cells = {}
            for P in positions:
                L = T + P  # positions already in its cache
                try:
                    cache = {}
                    for i in range(len(model.transformer.layers)):
                        kv = [torch.randn(B, heads, L, C // heads, generator=gen) for _ in range(2)]
                        cache[i] = (*kv, torch.randn(B, L, C, generator=gen))
                        if i == len(model.transformer.layers) - 1:
                            cache[i] = cache[i] + (torch.randn(B, L, C, generator=gen),)
                    ids = torch.randint(1, 8000, (B, L + 1), generator=gen)
                    cells[P] = median_ms(lambda: model(ids, mask, use_cache=True, cache=dict(cache)), reps)
                except RuntimeError as error:  # out of memory at long sequences and batch 8
                    cells[P] = None
                    print(f"  original batch {B} position {P}: {error}", file=sys.stderr, flush=True)
                    break
                finally:
                    cache = None
                print(f"  original batch {B} position {P}: {cells[P]:.1f} ms", file=sys.stderr, flush=True)
            out["steps_ms"][B] = cells
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def run_child(python: str, args: list) -> dict | None:
    """Run this script as ``python`` with ``args``; its last stdout line is the JSON result (None if it failed,
    e.g. killed for memory)."""
    proc = subprocess.run([python, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    if proc.returncode:
        print(f"{' '.join(args[:2])} failed with exit status {proc.returncode}; its column is left out",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 256, 512, 768, 1023])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reference-python", help="interpreter with rudalle 1.1.3 installed; omit to skip it")
    parser.add_argument("--reference-dir", default=os.path.join(HERE, "..", "..", "shared", "reference"),
                        help="folder of rudalle_compat.py (default ../shared/reference)")
    parser.add_argument("--full-run", nargs="*", choices=[f for f in FORMATS if f != "bf16-unpacked"], default=[],
                        help="formats to also time real images: one batch of each --batches size")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=FORMATS, help=argparse.SUPPRESS)
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.batches, args.positions, args.reps)
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, *common, args.worker in args.full_run)))
        return
    if args.reference_worker:
        print(json.dumps(reference_worker(args.weights, *common, os.path.abspath(args.reference_dir))))
        return
    passthrough = ["--batches", *map(str, args.batches), "--positions", *map(str, args.positions),
                   "--reps", str(args.reps)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="rudalle-scale-") as tmp:
        weights = os.path.join(tmp, "pytorch_model.bin")
        write_weights(weights)
        for fmt in args.formats:
            extra = ["--full-run", fmt] if fmt in args.full_run else []
            results[fmt] = run_child(sys.executable, ["--worker", fmt, "--weights", weights, *passthrough, *extra])
        if args.reference_python:
            results["original"] = run_child(args.reference_python, ["--reference-worker", "--weights", weights,
                                                                    "--reference-dir", args.reference_dir, *passthrough])
    results = {k: v for k, v in results.items() if v is not None}
    report(results, args)
    if args.json:
        from rudalle_pipe.files import atomic_write

        atomic_write(args.json, json.dumps(results, indent=1))


def report(results: dict, args) -> None:
    n = 1024
    orig = results.get("original")
    print(f"Malevich shape (24 layers, hidden 2048), this CPU ({os.cpu_count()} cores); ms per decoding step, "
          f"median of {args.reps}")
    for B in args.batches:
        head = f"| batch {B} | " + " | ".join(f"position {p}" for p in args.positions) + \
               " | whole image, projected | per image |"
        print("\n" + head + "\n|" + "---|" * (len(args.positions) + 3))
        one = {}
        for name, r in results.items():
            cells = r["steps_ms"][str(B)] if str(B) in r["steps_ms"] else r["steps_ms"].get(B, {})
            cells = {int(k): v for k, v in cells.items()}
            if not cells or any(v is None for v in cells.values()):
                shown = " | ".join("-" if cells.get(p) is None else f"{cells[p]:.0f}" for p in args.positions)
                print(f"| {name} | {shown} | (did not finish) | |")
                continue
            total = project_s(cells, n)
            one[name] = total / B
            ratio = f" ({orig_total / total:.1f}x faster than the original)" if orig and name != "original" and \
                (orig_total := _orig_total(orig, B, n)) else ""
            print(f"| {name} ({r.get('decoder', 'cached')}) | " + " | ".join(f"{cells[p]:.0f}" for p in args.positions)
                  + f" | {total:.1f} s{ratio} | {total / B:.1f} s |")
        for name, r in results.items():
            if "roofline_ms" in r:
                bound = {int(k): v for k, v in r["roofline_ms"][str(B) if str(B) in r["roofline_ms"] else B].items()}
                cells = {int(k): v for k, v in r["steps_ms"][str(B) if str(B) in r["steps_ms"] else B].items()}
                ratios = ", ".join(f"{cells[p] / bound[p]:.2f}x" for p in args.positions)
                print(f"  {name}: step / bandwidth bound at those positions: {ratios} "
                      f"({r['weight_bytes_per_step'] / 1e9:.2f} GB of weights a step, {r['bandwidth_gb_s']:.1f} GB/s)")
    if len(args.batches) > 1:
        b1, bn = args.batches[0], args.batches[-1]
        for name, r in results.items():
            try:
                per1 = project_s({int(k): v for k, v in r["steps_ms"][str(b1)].items()}, n) / b1
                pern = project_s({int(k): v for k, v in r["steps_ms"][str(bn)].items()}, n) / bn
                print(f"{name}: time per image at batch {bn} / at batch {b1}: {pern / per1:.2f}")
            except (KeyError, TypeError, ZeroDivisionError):
                pass
    for name, r in results.items():
        real = {int(k): v for k, v in r.get("full_run_s", {}).items()}
        extra = "".join(f", one real batch of {B} {s:.1f} s ({s / B:.1f} s per image)" for B, s in real.items())
        if len(real) > 1:
            (b1, s1), (bn, sn) = min(real.items()), max(real.items())
            extra += f", real time per image at batch {bn} / at batch {b1}: {sn / bn / (s1 / b1):.2f}"
        print(f"{name}: loading {r['load_s']:.1f} s, peak RSS of loading {r['load_peak_rss_gb']:.1f} GB, "
              f"of the whole run {r['peak_rss_gb']:.1f} GB{extra}")


def _orig_total(orig: dict, B: int, n: int):
    cells = orig["steps_ms"].get(str(B), {})
    if not cells or any(v is None for v in cells.values()):
        return None
    return project_s({int(k): v for k, v in cells.items()}, n)


if __name__ == "__main__":
    main()
