"""Decoding the demo when another process holds a core: two BLAS threads against one.

Rerun with (about a minute on a 2-core CPU; run it on an otherwise quiet machine)::

    python benchmarks/contention.py

It times 16 demo images (``generate_images``, top_k 32, one batch of 16) four ways, best of 3 each: alone and
beside one busy process (a Python loop spinning on a core), each with the backend's default for a small
model (one BLAS thread while decoding, see ``rudalle_pipe/backend.py``) and with two BLAS threads
(``SINGLE_THREAD_BYTES`` set to 0, as before). Printed: the times and the slowdown the busy core causes.
"""
from __future__ import annotations

import subprocess
import sys
import time

import rudalle_pipe.backend as backend
from rudalle_pipe import generate_images
from rudalle_pipe.pipeline import load_pipeline


def best_of_3(pipe) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate_images("красный круг", pipe.tokenizer, pipe.dalle, pipe.vae, top_k=32, top_p=0.99, num_images=16,
                        batch_size=16, seed=0, progress=False)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    pipe = load_pipeline("demo", clip=False, upscaler=False)
    best_of_3(pipe)  # warm-up
    default = backend.SINGLE_THREAD_BYTES
    results = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for name, threshold in (("one BLAS thread (default)", default), ("two BLAS threads", 0)):
                backend.SINGLE_THREAD_BYTES = threshold
                results[busy, name] = best_of_3(pipe)
        finally:
            backend.SINGLE_THREAD_BYTES = default
            if hog is not None:
                hog.kill()
                hog.wait()
    print("16 demo images, best of 3 (s):")
    for name in ("one BLAS thread (default)", "two BLAS threads"):
        alone, busy = results[False, name], results[True, name]
        print(f"  {name:26s} alone {alone:5.2f}   beside a busy core {busy:6.2f}   slowdown {busy / alone:5.1f}x")


if __name__ == "__main__":
    main()
