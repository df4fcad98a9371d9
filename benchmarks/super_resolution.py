"""Time and peak memory of rudalle_pipe.realesrgan.super_resolution, tiled vs untiled, on CPU.

Rerun from the repo root (with the package importable, e.g. `pip install -e .` or PYTHONPATH=.):

    python benchmarks/super_resolution.py                 # default cases, ~5 min on 2 idle cores
    python benchmarks/super_resolution.py --full          # also 1024 px at full depth (~10+ min, ~15 GB untiled)
    python benchmarks/super_resolution.py --sizes 256 --num-block 23 --threads 1

What it measures:
* The real x4 architecture (num_feat 64, num_grow_ch 32, num_block 23) with *random* weights: the
  compute and memory do not depend on the weight values, so no download is needed.
* Each case runs in a fresh subprocess. "peak RSS" is that process's `resource.getrusage` max RSS;
  "peak increase" is max RSS minus the RSS just before the `super_resolution` call (model and input
  already built), i.e. what upscaling itself needed on top. Times are one call, no warm-up run.
* 1024 px at full depth takes ~15x the 256 px time (about 4-5 min per case on 2 cores), so by default
  the 1024 px cases use num_block 1 (`--num-block-large`). Peak memory barely depends on depth: it is
  set by the full-resolution feature maps of the upsampling path (64 ch at 4x size). The full-depth
  time at 1024 px is *estimated* from the 256 px full-depth run by scaling with the pixels processed.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

logger = logging.getLogger("benchmark")

TILE_SIZE, TILE_OVERLAP, BATCH_SIZE = 192, 24, 4  # super_resolution defaults


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(size: int, tiled: bool, num_block: int, threads: int | None) -> dict:
    """Run one case in this process; returns seconds, peak RSS and peak increase (MB)."""
    import numpy as np
    import torch
    from PIL import Image

    from rudalle_pipe.realesrgan import RRDBNet, RRDBNetConfig, _tile_grid, super_resolution

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = RRDBNet(RRDBNetConfig(num_block=num_block, scale=4)).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    padded = torch.empty(1, 1, size + 30, size + 30)  # 15 px reflect pad on each side
    tiles = _tile_grid(padded, TILE_SIZE if tiled else None, TILE_OVERLAP, 1)
    before = _rss_mb()
    start = time.perf_counter()
    (out,) = super_resolution(
        [image], model, tile_size=TILE_SIZE if tiled else None, tile_overlap=TILE_OVERLAP,
        batch_size=BATCH_SIZE, progress=False,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert out.size == (4 * size, 4 * size)
    return dict(seconds=seconds, peak_mb=peak, increase_mb=peak - before, tiles=len(tiles),
                pixels=len(tiles) * tiles[0][2] * tiles[0][3], threads=torch.get_num_threads())


def run_in_subprocess(size: int, tiled: bool, num_block: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([size, tiled, num_block, threads])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(error=f"exit {proc.returncode} (killed for memory?): {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="square input sizes")
    parser.add_argument("--num-block", type=int, default=23, help="RRDB blocks (real model: 23)")
    parser.add_argument("--large", type=int, default=512, help="sizes above this use --num-block-large")
    parser.add_argument("--num-block-large", type=int, default=1, help="RRDB blocks for large sizes")
    parser.add_argument("--full", action="store_true", help="use --num-block for every size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(*json.loads(args.child))))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("super_resolution benchmark: RRDBNet x4, num_feat 64, num_grow_ch 32, random weights, CPU")
    logger.info("tiled = tile_size %d, tile_overlap %d, batch_size %d; untiled = tile_size None; 15 px border pad",
                TILE_SIZE, TILE_OVERLAP, BATCH_SIZE)
    header = f"{'size':>5} {'blocks':>6} {'mode':>8} {'tiles':>5} {'Mpx in':>6} {'time s':>7} {'peak RSS MB':>11} {'peak incr MB':>12}"
    logger.info(header)
    results = {}
    for size in args.sizes:
        blocks = args.num_block if args.full or size <= args.large else args.num_block_large
        for tiled in (True, False):
            r = run_in_subprocess(size, tiled, blocks, args.threads)
            results[size, tiled] = r | dict(blocks=blocks)
            mode = "tiled" if tiled else "untiled"
            if "error" in r:
                logger.info(f"{size:>5} {blocks:>6} {mode:>8}  FAILED: {r['error']}")
                continue
            logger.info(f"{size:>5} {blocks:>6} {mode:>8} {r['tiles']:>5} {r['pixels'] / 1e6:>6.3f} {r['seconds']:>7.1f} "
                        f"{r['peak_mb']:>11.0f} {r['increase_mb']:>12.0f}")
    logger.info("ratios tiled / untiled:")
    for size in args.sizes:
        t, u = results[size, True], results[size, False]
        if "error" in t or "error" in u:
            continue
        logger.info(f"  {size} px: time x{t['seconds'] / u['seconds']:.2f}, peak increase x{t['increase_mb'] / u['increase_mb']:.2f}")
    small = [s for s in args.sizes if results[s, True].get("blocks") == args.num_block and "error" not in results[s, True]]
    if small and not args.full:
        ref = results[small[0], True]
        per_px = ref["seconds"] / ref["pixels"]
        for size in args.sizes:
            for tiled in (True, False):
                r = results[size, tiled]
                if r.get("blocks") != args.num_block and "error" not in r:
                    logger.info(f"  estimated full-depth time, {size} px {'tiled' if tiled else 'untiled'}: "
                                f"~{per_px * r['pixels']:.0f} s (scaled by pixels from {small[0]} px tiled)")
    logger.info("torch threads: %s", next((r["threads"] for r in results.values() if "threads" in r), "?"))


if __name__ == "__main__":
    main()
