"""Command line: ``python -m rudalle_pipe.train demo --out DIR [--quick] [--install] [--overwrite] [--no-progress]``.

Works the same under ``accelerate launch -m rudalle_pipe.train demo ...`` (only the main process writes
final files).
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rudalle_pipe.train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train the embedded demo family (tokenizer, VQGAN, generator, "
                                            "CLIP, x4 upscaler) and package it as a pipeline directory")
    demo.add_argument("--out", required=True, help="working directory (a rerun resumes from it)")
    demo.add_argument("--quick", action="store_true", help="tiny configs that run in seconds (smoke test)")
    demo.add_argument("--install", action="store_true", help="copy the pipeline into rudalle_pipe/weights/demo")
    demo.add_argument("--overwrite", action="store_true", help="with --install, replace an installed demo")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from .demo import train_demo

    path = train_demo(args.out, quick=args.quick, progress=not args.no_progress, do_install=args.install,
                      overwrite=args.overwrite)
    logging.getLogger(__name__).info("pipeline written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
