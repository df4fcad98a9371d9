"""What the Malevich chain downloads, computed from the original checkpoints' key lists (no download).

Rerun from the repo root::

    python benchmarks/download_sizes.py                      # reads ../shared/fixtures/manifests
    python benchmarks/download_sizes.py --manifests DIR      # another copy of the manifests

``../shared/fixtures/manifests/*.json`` list every key, shape and dtype of the full-size models
(``../shared/fixtures/README.md``), and ``../shared/RUDALLE_FACTS.md`` says how each file stores them:
the generator checkpoints in fp16, the VQGAN checkpoints as fp32 Lightning checkpoints (possibly with
loss keys that inference ignores, so the file can be larger). For Real-ESRGAN neither source gives the
stored dtype, so both fp32 and fp16 sizes are printed. The CLIP reranker is not a ruDALL-E file and is
not covered by these sources: its size is not printed. Sizes count tensor bytes only (MB = 10^6 bytes);
a file adds a little for its container.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger("benchmark")

ROOT = Path(__file__).resolve().parent.parent
# manifest -> (what, bytes per element as stored, or None where the sources do not say)
FILES = {
    "dalle_Malevich.json": ("generator Malevich (pytorch_model_v3.bin), stored in fp16", 2),
    "vqgan.json": ("VQGAN (vqgan.gumbelf8-sber.model.ckpt), fp32; the file may hold more (loss keys)", 4),
    "realesrgan_x4.json": ("Real-ESRGAN x4 (RealESRGAN_x4.pth), stored dtype not given", None),
}


def tensor_stats(manifest: dict) -> tuple[int, int]:
    """(parameters, bytes of the non-float entries) of a manifest ``{key: [shape, dtype]}``; bool and
    integer entries (the generator's mask buffers) count one byte per element."""
    floats = other = 0
    for shape, dtype in manifest.values():
        count = math.prod(shape)
        if "float" in dtype:
            floats += count
        else:
            other += count
    return floats, other


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=Path, default=ROOT.parent / "shared" / "fixtures" / "manifests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, (what, width) in FILES.items():
        floats, other = tensor_stats(json.loads((args.manifests / name).read_text()))
        if width is None:
            size = f"{floats * 4 / 1e6:,.0f} MB in fp32, {floats * 2 / 1e6:,.0f} MB in fp16"
        else:
            size = f"{(floats * width + other) / 1e6:,.0f} MB"
        logger.info("%-80s %8.1fM parameters  %s", what, floats / 1e6, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
