"""Peak memory of loading an fp16 generator checkpoint into an fp32 model: ours against a naive loader.

Rerun from the repo root (with the package installed, e.g. ``pip install -e .``)::

    python benchmarks/loading_memory.py                  # 6 layers x 1024 (~300 MB fp32), ~1 min
    python benchmarks/loading_memory.py --layers 24 --hidden 2048   # Malevich's size (needs ~12 GB free)

Each loader runs in a fresh subprocess; printed is the growth of the peak resident set (``ru_maxrss``)
over the post-import baseline, as a ratio of one fp32 copy of the weights. The naive loader builds the
model with random weights, reads the whole file, converts it and copies it in (about 2.5 copies at the
peak); ``get_rudalle_model`` builds on the meta device and assigns memory-mapped tensors converted one
at a time (one copy). The exact property (built on meta, no tensor copied) is tested in
``tests/test_loader.py``; this number depends on the allocator, the page cache and the machine (pages of
the memory-mapped file count while they are resident), so it is measured here. Last measured (6 x 1024,
this project's 2-core machine, three runs): ours 1.27x, 1.18x, 1.18x; naive 1.44x each time.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from rudalle_pipe import DalleConfig, DalleModel

logger = logging.getLogger("benchmark")

LOADERS = {
    "get_rudalle_model": "m = rudalle_pipe.get_rudalle_model('Malevich', checkpoint_path=PATH, **CONFIG)",
    "naive (init, load, convert, copy)": textwrap.dedent("""\
        m = rudalle_pipe.DalleModel(rudalle_pipe.DalleConfig(**CONFIG))
        state = torch.load(PATH, weights_only=True)
        m.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)"""),
}


def _grown(path: Path, config: dict, code: str) -> int:
    script = "\n".join([
        "import resource, torch, rudalle_pipe",
        f"PATH, CONFIG = {str(path)!r}, {config!r}",
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024",
        code,
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the loader failed: {done.stderr.strip()}")
    return int(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        model = DalleModel(DalleConfig(**config)).half()
        torch.save(model.state_dict(), path)
        fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
        del model
        logger.info("fp16 file %.0f MB, one fp32 copy %.0f MB", path.stat().st_size / 1e6, fp32_bytes / 1e6)
        for name, code in LOADERS.items():
            grown = _grown(path, config, code)
            logger.info("%-36s peak RSS growth %7.0f MB = %.2fx one fp32 copy", name, grown / 1e6, grown / fp32_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
