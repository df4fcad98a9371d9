"""Decoding and loading the demo when another process holds a core: one thread against two.

Rerun with (about a minute on a 2-core CPU; run it on an otherwise quiet machine)::

    python benchmarks/contention.py

It times 16 demo images (``generate_images``, top_k 32, one batch of 16) four ways, best of 3 each: alone and
beside one busy process (a Python loop spinning on a core), each with the backend's default for a small
model (one BLAS thread while decoding, see ``rudalle_pipe/backend.py``) and with two BLAS threads
(``SINGLE_THREAD_BYTES`` set to 0, as before). It also times loading the demo pipeline
(``load_pipeline("demo")``) the same four ways: the backend casts and checks a small model's weights on one
torch thread (``backend.small_tensor_threads``), or on torch's default threads with the threshold at 0.
Printed: the times and the slowdown the busy core causes.
"""
from __future__ import annotations

import subprocess
import sys
import time

import rudalle_pipe.backend as backend
from rudalle_pipe import generate_images
from rudalle_pipe.pipeline import load_pipeline


def best_of_3(work) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    pipe = load_pipeline("demo", clip=False, upscaler=False)
    jobs = {
        "16 demo images": lambda: generate_images(
            "красный круг", pipe.tokenizer, pipe.dalle, pipe.vae, top_k=32, top_p=0.99, num_images=16,
            batch_size=16, seed=0, progress=False),
        "loading the demo pipeline": lambda: load_pipeline("demo"),
    }
    for work in jobs.values():
        work()  # warm-up
    default = backend.SINGLE_THREAD_BYTES
    modes = (("one thread (default)", default), ("two threads", 0))
    results = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for job, work in jobs.items():
                for name, threshold in modes:
                    backend.SINGLE_THREAD_BYTES = threshold
                    results[job, busy, name] = best_of_3(work)
        finally:
            backend.SINGLE_THREAD_BYTES = default
            if hog is not None:
                hog.kill()
                hog.wait()
    for job in jobs:
        print(f"{job}, best of 3 (s):")
        for name, _ in modes:
            alone, busy = results[job, False, name], results[job, True, name]
            print(f"  {name:22s} alone {alone:5.2f}   beside a busy core {busy:6.2f}   slowdown {busy / alone:5.1f}x")


if __name__ == "__main__":
    main()
