"""Generation speed: the key/value cache against full recomputation, batch-1 decoding against the
memory-bandwidth roofline, and the cost of classifier-free guidance.

Rerun with::

    python benchmarks/generation.py            # about 2-3 minutes on a 2-core CPU
    python benchmarks/generation.py --quick    # fewer tokens, for a smoke run
    python benchmarks/generation.py --guidance-only   # only section 4 (about 3 minutes)

Everything is measured in this one run on this machine, with random weights (speed does not depend
on their values):

1. memory bandwidth: best-of-N streaming read of a 1 GiB fp32 tensor (``tensor.sum()``);
2. cache ratio: a full 1024-token generation of a small config (4 layers, hidden 64, the real
   vocabularies), per image token, with the cache and with full recomputation at every step;
3. roofline ratio: batch-1 time per image token of a Malevich-shaped but shallow config (hidden
   2048, 16 heads, 2 layers) against ``bytes one step must read / bandwidth``, where those bytes are
   the layers' weights and the image part of the output head. The bandwidth of a shared VM drifts
   by 2x within minutes, so decoding runs in blocks of 64 tokens, each right after its own
   bandwidth reading, and the ratio is the median over blocks.
4. guidance ratio: the same Malevich-shaped config at batch 1, time per decoding step of
   ``sample_codes`` with ``guidance_scale=3`` (2 rows: the image and its empty-text partner, one
   cache, each weight read once for both rows by the numpy BLAS path) against ``guidance_scale=1``
   (1 row). Each run times its first positions through a step callback that then cancels it; runs
   alternate unguided/guided so that bandwidth drift hits both, and the ratio is the median over
   pairs.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from rudalle_pipe import DalleConfig, DalleModel
from rudalle_pipe.generation import GenerationCancelled, _draw, decoding_threads, sample_codes


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second of the best streaming read of a ``gib`` GiB fp32 tensor."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def time_generation(model: DalleModel, *, use_cache: bool) -> float:
    """Seconds per image token of one batch-1 sampling run over the whole image grid."""
    cfg = model.config
    text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (cfg.text_seq_length,))
    start = time.perf_counter()
    sample_codes(model, text, seeds=[0], top_k=512, top_p=0.99, use_cache=use_cache, progress=False)
    return (time.perf_counter() - start) / cfg.image_seq_length


@torch.inference_mode()
def decode_blocks(model: DalleModel, *, tokens: int, block: int) -> list[tuple[float, float]]:
    """Batch-1 cached decoding of ``tokens`` image tokens (sampling included), in blocks of ``block``.

    The machine's bandwidth drifts (other tenants), so each block is timed right after its own
    bandwidth reading. Returns ``(seconds per token, bytes per second)`` per block.
    """
    cfg = model.config
    text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (1, cfg.text_seq_length))
    cache = model.init_cache(1)
    out = model(text, past_key_values=cache, use_cache=True, image_logits_only=True, last_only=True)
    generators = [torch.Generator().manual_seed(0)]
    results = []
    for first in range(0, tokens - 1, block):
        bandwidth = read_bandwidth(gib=0.5, repeats=3)
        steps = min(block, tokens - 1 - first)
        with decoding_threads(model, 1):  # as sample_codes does
            start = time.perf_counter()
            for _ in range(steps):
                code = _draw(out.logits[:, -1], generators, top_k=512, top_p=0.99, temperature=1.0)
                out = model(code[:, None], past_key_values=cache, use_cache=True, image_logits_only=True,
                            last_only=True)
            elapsed = time.perf_counter() - start
        results.append((elapsed / steps, bandwidth))
    return results


def step_time(model: DalleModel, *, guidance_scale: float, steps: int) -> float:
    """Median seconds per decoding step of one batch-1 ``sample_codes`` run over its first ``steps``
    positions (sampling, guidance mix and the callback's copy included): a step callback records a
    timestamp at each position and cancels the run after ``steps``."""
    cfg = model.config
    text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (cfg.text_seq_length,))
    stamps: list[float] = []

    def tick(step: int, total: int, codes: torch.Tensor) -> bool:
        stamps.append(time.perf_counter())
        return step < steps  # False cancels: the timing is done

    try:
        sample_codes(model, text, seeds=[0], top_k=512, top_p=0.99, guidance_scale=guidance_scale,
                     callback=tick, progress=False)
    except GenerationCancelled:
        pass  # expected: the callback stops the run after `steps` positions
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 16x16 grid (256 tokens) instead of 32x32")
    parser.add_argument("--guidance-only", action="store_true", help="skip the cache and roofline sections")
    args = parser.parse_args()
    side = 16 if args.quick else 32
    tokens = side * side
    torch.manual_seed(0)
    print(f"# rudalle_pipe generation benchmark — torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("# rerun: python benchmarks/generation.py [--quick] [--guidance-only]")

    if not args.guidance_only:
        bandwidth = read_bandwidth()
        print(f"memory bandwidth (streaming fp32 read): {bandwidth / 1e9:.1f} GB/s")

        with torch.inference_mode():
            small = DalleModel(DalleConfig(num_layers=4, hidden_size=64, num_attention_heads=4, image_tokens_per_dim=side)).eval()
            cached = time_generation(small, use_cache=True)
            full = time_generation(small, use_cache=False)
        print(f"\n[cache] 4 layers, hidden 64, {tokens} image tokens, batch 1")
        print(f"  with cache:      {cached * 1e3:8.2f} ms/token")
        print(f"  without cache:   {full * 1e3:8.2f} ms/token (whole sequence recomputed every step)")
        print(f"  cache ratio:     {full / cached:8.1f}x   (goal >= 20x)")

    cfg = DalleConfig(num_layers=2, hidden_size=2048, num_attention_heads=16, image_tokens_per_dim=side)
    big = DalleModel(cfg).eval()
    if not args.guidance_only:
        layer_bytes = sum(p.numel() * p.element_size() for p in big.transformer.layers.parameters())
        head = big.to_logits[1]
        head_bytes = (head.weight[cfg.vocab_size:].numel() + head.bias[cfg.vocab_size:].numel()) * head.weight.element_size()
        step_bytes = layer_bytes + head_bytes
        blocks = decode_blocks(big, tokens=tokens, block=64)
        per_token = statistics.median(t for t, _ in blocks)
        bw = statistics.median(b for _, b in blocks)
        ratios = sorted(t / (step_bytes / b) for t, b in blocks)
        print(f"\n[roofline] hidden 2048, 16 heads, 2 layers, fp32, batch 1, {tokens} image tokens "
              f"in {len(blocks)} blocks, each timed right after its own bandwidth reading")
        print(f"  weights read per step: {step_bytes / 1e6:.1f} MB (layers {layer_bytes / 1e6:.1f} + image head {head_bytes / 1e6:.1f})")
        print(f"  bandwidth (median):    {bw / 1e9:8.1f} GB/s")
        print(f"  bandwidth bound:       {step_bytes / bw * 1e3:8.2f} ms/token")
        print(f"  measured (median):     {per_token * 1e3:8.2f} ms/token")
        print(f"  roofline ratio:        {statistics.median(ratios):8.2f}x median, {ratios[0]:.2f}x-{ratios[-1]:.2f}x "
              f"over blocks  (goal <= 1.5x)")

    steps, pairs = (64, 3) if args.quick else (128, 5)
    unguided, guided = [], []
    for _ in range(pairs):  # alternate, so that drift hits both
        unguided.append(step_time(big, guidance_scale=1.0, steps=steps))
        guided.append(step_time(big, guidance_scale=3.0, steps=steps))
    ratios = sorted(g / u for u, g in zip(unguided, guided))
    print(f"\n[guidance] hidden 2048, 16 heads, 2 layers, fp32, batch 1, first {steps} image positions, "
          f"{pairs} alternating pairs of runs")
    print(f"  unguided (1 row):      {statistics.median(unguided) * 1e3:8.2f} ms/step median")
    print(f"  guided, scale 3 (2 rows, one cache): {statistics.median(guided) * 1e3:8.2f} ms/step median")
    print(f"  guidance ratio:        {statistics.median(ratios):8.2f}x median, {ratios[0]:.2f}x-{ratios[-1]:.2f}x "
          f"over pairs  (goal <= 1.3x)")


if __name__ == "__main__":
    main()
