"""How fast `rudalle-pipe generate --model Malevich` fails without network, and what it prints.

Rerun from the repo root (with the package installed, e.g. `pip install -e .`):

    python benchmarks/offline_failure.py            # 3 runs per case, ~1 min

Two kinds of "no network", both on loopback only (no traffic leaves the machine):
* **refused**: ``HF_ENDPOINT`` points at a closed port (what a machine without a route often sees);
* **silent**: ``HF_ENDPOINT`` points at a listening socket that never answers (a firewall that drops
  packets, a dead proxy): the worst case, where every request waits for its timeout.

Each run uses an empty Hugging Face cache, ``HF_HUB_OFFLINE`` unset, in a fresh subprocess, so the
wall time includes Python start-up and imports. Printed: the median wall time over the runs, the exit
status, how many lines reached stderr, and how many connections the silent server saw. For
comparison, the same run with ``HF_HUB_OFFLINE=1`` (no request at all) is timed too.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger("benchmark")


def _run(endpoint: str | None, offline: bool) -> tuple[float, int, list[str]]:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HUB_CACHE=cache, HF_HOME=cache)
        if endpoint is not None:
            env["HF_ENDPOINT"] = endpoint
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rudalle_pipe", "generate", "рыжий котик", "--model", "Malevich",
                               "--out", out, "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
        return time.perf_counter() - start, done.returncode, done.stderr.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connections are refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts into the backlog, never answers
    silent.setblocking(False)

    cases = {"refused": f"http://127.0.0.1:{refused_port}", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
             "HF_HUB_OFFLINE=1": None}
    logger.info("%-18s %10s %6s %14s %12s", "case", "median s", "exit", "stderr lines", "connections")
    for name, endpoint in cases.items():
        times, codes, lines, connections = [], set(), set(), 0
        for _ in range(args.runs):
            seconds, code, err = _run(endpoint, offline=endpoint is None)
            times.append(seconds)
            codes.add(code)
            lines.add(len(err))
            while True:  # count and drop what the silent server accepted
                try:
                    conn, _ = silent.accept()
                except BlockingIOError:
                    break
                connections += 1
                conn.close()
        logger.info("%-18s %10.2f %6s %14s %12s", name, statistics.median(times), ",".join(map(str, sorted(codes))),
                    ",".join(map(str, sorted(lines))), connections if name == "silent" else "-")
    logger.info("last stderr: %s", err[-1] if err else "(none)")
    silent.close()


if __name__ == "__main__":
    main()
