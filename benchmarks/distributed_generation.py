"""Time ``rudalle-pipe generate --prompts FILE`` on the demo model with 1 and with 2 processes, in one run.

    PYTHONPATH=. python benchmarks/distributed_generation.py [--prompts 16] [--num-images 4]

The 2-process run uses the launch command the README documents for a machine without a GPU
(``accelerate launch --multi_gpu --num_processes 2 ... --main_process_port 0``; ``--cpu`` would start one
process). Each run is the whole command: Python start-up, model load on every process, generation,
reranking and writing; images/s counts every image drawn. The two runs' outputs are compared byte for byte.
On a 2-core CPU the two processes share the cores (each gets OMP_NUM_THREADS=1; the 1-process run gets
both, its default), so the ratio says what scale-out costs or gains here, not on several GPUs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLOURS = ["красный", "синий", "зелёный", "жёлтый"]
SHAPES = ["круг", "квадрат", "треугольник", "крест"]


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the file (default: 16)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default: 4)")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="rudalle-dist-bench-") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        lines = [f"{COLOURS[i % 4]} {SHAPES[(i // 4) % 4]}" for i in range(args.prompts)]
        prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(repo), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
        common = ["-m", "rudalle_pipe", "generate", "--prompts", str(prompts), "--model", "demo", "--num-images",
                  str(args.num_images), "--seed", "0", "--no-progress", "--device", "cpu"]
        images = args.prompts * args.num_images
        one = run([sys.executable, *common, "--out", str(tmp / "one")], env)
        two = run([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                   *common, "--out", str(tmp / "two")], {**env, "OMP_NUM_THREADS": "1"})
        same = outputs(tmp / "one") == outputs(tmp / "two")
    cores = os.cpu_count()
    print(f"demo model, {args.prompts} prompts x {args.num_images} images = {images} images, {cores} CPU cores")
    print(f"1 process : {one:6.1f} s  {images / one:5.2f} images/s")
    print(f"2 processes: {two:6.1f} s  {images / two:5.2f} images/s")
    print(f"ratio (2 processes / 1 process, images/s): {one / two:.2f}x; PNGs byte-identical: {same}")
    print("rerun: PYTHONPATH=. python benchmarks/distributed_generation.py "
          f"--prompts {args.prompts} --num-images {args.num_images}")


if __name__ == "__main__":
    main()
