"""Run the README's first command as a newcomer would and rebuild its picture, ``docs/demo_first_command.png``.

Rerun with::

    python benchmarks/first_command.py            # where the time goes, and what the detector reads in the 4 best
    python benchmarks/first_command.py --write    # also replaces docs/demo_first_command.png (atomically)
    python benchmarks/first_command.py --seeds 200  # also: how often the best of 4 follows the text, seeds 0-199

The command is read from the README's first ``bash`` block (``rudalle-pipe generate "..." [flags]``) and run
through ``python -m rudalle_pipe`` in a temporary folder that is removed afterwards. The picture is the
command's best 4 images (``image_000.png`` ... ``image_003.png``), side by side.

``--seeds N`` redoes the command's drawing and ranking in this process for ``--seed 0`` ... ``--seed N-1`` (the
library calls the command makes, with its defaults; no upscaling, which does not change the ranking) and
prints in how many the best picture follows the text, by the shapes detector, and which seeds miss.

Where the time goes: the wall time of the whole command, split by the stage timings the command writes into
``results.json`` (load, generate, rerank, upscale, save); the rest is Python's start-up, imports and the
argument checks. Also the wall time of ``rudalle-pipe --help`` (best of 3), which must not import torch.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from rudalle_pipe import shapes
from rudalle_pipe.files import atomic_write
from rudalle_pipe.show import image_grid

ROOT = Path(__file__).resolve().parent.parent


def first_command() -> list[str]:
    """The arguments after ``rudalle-pipe`` in the README's first bash block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    if block is None:
        raise SystemExit("README.md has no ```bash block")
    line = next(part for part in block.group(1).split("&&") if "rudalle-pipe" in part)
    return shlex.split(line.split("rudalle-pipe", 1)[1])


def best_of_seeds(argv: list[str], count: int) -> None:
    """Print how often the command's best picture follows its text, over ``--seed 0 .. count-1``."""
    from rudalle_pipe import generate_images, rerank
    from rudalle_pipe.cli import DEFAULT_TOP_K
    from rudalle_pipe.pipeline import load_pipeline

    if len(argv) != 2 or argv[0] != "generate":
        raise SystemExit(f"--seeds expects the README's command to be 'generate TEXT', got {shlex.join(argv)}")
    text, pipe = argv[1], load_pipeline("demo", upscaler=False)
    target, misses = shapes.parse_caption(text), []
    for seed in range(count):
        out = generate_images(text, pipe.tokenizer, pipe.dalle, pipe.vae, num_images=4, seed=seed, top_p=0.995,
                              top_k=min(DEFAULT_TOP_K, pipe.dalle.config.image_vocab_size), progress=False)
        best = rerank(out.images, text, clip=pipe.clip, by="clip", progress=False).images[0]
        if not all(shapes.attribute_matches(shapes.detect(best), target).values()):
            misses.append(seed)
    print(f"best of 4 follows the text in {count - len(misses)} of {count} seeds (0-{count - 1}); "
          f"misses at seeds {misses}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace docs/demo_first_command.png")
    parser.add_argument("--seeds", type=int, default=0, metavar="N",
                        help="also count the seeds 0..N-1 where the best of 4 follows the text")
    args = parser.parse_args()
    argv = first_command()
    if args.seeds:
        best_of_seeds(argv, args.seeds)
    with tempfile.TemporaryDirectory(prefix="rudalle_first_") as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rudalle_pipe", *argv, "--out", str(Path(tmp) / "out"),
                               "--no-progress"], capture_output=True, text=True, cwd=tmp)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the command failed ({done.returncode}): {done.stderr.strip()}")
        out = Path(tmp) / "out"
        record = json.loads((out / "results.json").read_text(encoding="utf-8"))
        best = [Image.open(out / f"image_{i:03d}.png").convert("RGB") for i in range(4)]
    stages = record.get("timings_s", {})
    staged = sum(v for k, v in stages.items() if k != "total")
    print("where the time goes: " + ", ".join(
        [f"start-up, imports and checks {seconds - stages.get('total', staged):.2f} s"]
        + [f"{k} {v:.2f} s" for k, v in stages.items() if k != "total"]))
    helps = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rudalle_pipe", "--help"], capture_output=True, check=True)
        helps.append(time.perf_counter() - start)
    print(f"rudalle-pipe --help: {min(helps):.2f} s (best of 3)")
    text = next(a for a in argv if not a.startswith("-") and a != "generate")
    target = shapes.parse_caption(text)
    print(f"rudalle-pipe {shlex.join(argv)}: {seconds:.1f} s (with model loading), "
          f"{len(record.get('images', []))} images written")
    for i, image in enumerate(best):
        found = shapes.detect(image)
        print(f"  image_{i:03d}.png {image.size[0]}x{image.size[1]}: detector reads {found.to_scene() if found.shape else found}"
              f" -> {'right' if all(shapes.attribute_matches(found, target).values()) else 'WRONG'}")
    if args.write:
        buffer = io.BytesIO()
        image_grid(best, nrow=4).save(buffer, format="PNG", optimize=True)
        atomic_write(ROOT / "docs" / "demo_first_command.png", buffer.getvalue())
        print("wrote docs/demo_first_command.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
