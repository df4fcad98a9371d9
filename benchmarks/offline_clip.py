"""How long ``get_clip()`` (the default multilingual CLIP) takes to fail offline with an empty cache.

Rerun from the repo root (with the package installed, e.g. ``pip install -e .``)::

    python benchmarks/offline_clip.py            # 3 runs, a few seconds

Each run uses a fresh empty cache folder and ``HF_HUB_OFFLINE=1`` in a fresh subprocess, and times the
``get_clip`` call alone (imports excluded). It should fail at once with ``WeightsNotFoundError``: no
request and no retry. ``tests/test_clip.py`` checks the error's message; the time is measured here
because timing asserts in tests fail on busy machines. (Moved from that test, which asserted < 10 s.)
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile

logger = logging.getLogger("benchmark")

CHILD = """
import sys, time
from rudalle_pipe.clip import get_clip
from rudalle_pipe.hub import WeightsNotFoundError
start = time.perf_counter()
try:
    get_clip(cache_dir=sys.argv[1])
except WeightsNotFoundError:
    print(f"{time.perf_counter() - start:.3f}")
else:
    sys.exit("get_clip() found weights in an empty cache")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs (median reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    times = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            env.update(HF_HUB_OFFLINE="1", HF_HOME=cache)
            done = subprocess.run([sys.executable, "-c", CHILD, cache], capture_output=True, text=True, env=env,
                                  timeout=600)
            if done.returncode != 0:
                raise SystemExit(f"the run failed: {done.stderr.strip() or done.stdout.strip()}")
            times.append(float(done.stdout.split()[-1]))
    logger.info("get_clip() offline, empty cache: WeightsNotFoundError after %.2f s (median of %d; runs: %s)",
                statistics.median(times), len(times), ", ".join(f"{t:.2f}" for t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
