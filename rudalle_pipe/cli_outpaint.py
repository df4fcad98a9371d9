"""The ``rudalle-pipe outpaint IMG TEXT --right K | --down K`` verb: extend a picture by ``K`` codes per
step, ``--steps`` times (see :func:`rudalle_pipe.inpaint.outpaint`), and write the stitched panoramas
(``image_000.png``, ...) and ``results.json`` into ``--out`` through :func:`rudalle_pipe.outputs.write_run`
(atomic, ``--overwrite``-safe, like ``generate``). Every flag, the picture and ``--out`` are checked
before any model loads. Registered in :data:`rudalle_pipe.cli.VERBS`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["cmd_outpaint", "add_outpaint"]


def _check_outpaint_args(args: argparse.Namespace):
    """Validate what needs no weights; returns ``(source, image, sha256, k, direction)``."""
    from .checks import check_int
    from .cli import DEFAULT_TOP_K, FLAGS, UsageError, _check_text, _one_line, _resolve_device, _resolve_model, \
        default_model
    from .cli_image_prompt import _open_image
    from .generation import _MAX_SEED, check_sampling_args
    from .inpaint import MAX_OUTPAINT_STEPS

    _check_text("TEXT", args.text)
    if not args.text.strip():
        raise UsageError("TEXT is empty; give a prompt, e.g. rudalle-pipe outpaint picture.png 'горы'")
    if args.model is not None:
        _check_text("--model", args.model)
    source = _resolve_model(args.model or default_model())
    if args.top_k is None:
        args.top_k = min(DEFAULT_TOP_K, source.image_vocab)
    side = source.vae_resolution // source.vae_factor
    direction, k = ("right", args.right) if args.right is not None else ("down", args.down)
    try:
        check_sampling_args(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                            vocab=source.image_vocab, num_images=args.num_images, seed=args.seed, names=FLAGS)
        check_int(f"--{direction} (codes, grid {side}x{side})", k, low=1, high=side - 1)
        check_int("--steps", args.steps, low=1, high=MAX_OUTPAINT_STEPS)
        if args.seed is not None:  # every step of every panorama takes the next seed
            check_int("--seed (uses S .. S + --steps * --num-images - 1)", args.seed, low=0,
                      high=_MAX_SEED - args.steps * args.num_images)
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    image, sha = _open_image("IMG", args.image)
    args.device = _resolve_device(args.device)
    return source, image, sha, k, direction


def cmd_outpaint(args: argparse.Namespace) -> int:
    """``rudalle-pipe outpaint``: check, load the generator and VQGAN, outpaint, write the panoramas."""
    import torch

    from .cli import EXIT_OK, PROG
    from .files import check_writable_dir
    from .inpaint import outpaint
    from .outputs import RESULTS, check_targets, image_name, png_bytes, png_size_bound, write_run
    from .pipeline import load_pipeline

    source, image, sha, k, direction = _check_outpaint_args(args)
    names = [image_name(i) for i in range(args.num_images)]
    out = Path(args.out)
    previous = check_targets(out, names, overwrite=args.overwrite)
    side = source.vae_resolution // source.vae_factor
    long_side = source.image_side + args.steps * k * source.image_side // side
    needed = args.num_images * png_size_bound(long_side, source.image_side) + 4096 + 256 * args.steps * args.num_images
    check_writable_dir(out, needed_bytes=needed, what="--out")

    start = time.perf_counter()
    pipe = load_pipeline(source.name, device=args.device, dtype=getattr(torch, args.dtype), cache_dir=args.cache_dir,
                         clip=False, upscaler=False)
    loaded = time.perf_counter()
    result = outpaint(image, args.text, pipe.tokenizer, pipe.dalle, pipe.vae, **{direction: k}, steps=args.steps,
                      top_k=args.top_k, top_p=args.top_p, num_images=args.num_images, temperature=args.temperature,
                      seed=args.seed, progress=not args.no_progress)
    done = time.perf_counter()

    def record() -> bytes:
        results = {
            "text": args.text, "model": source.name, "model_kind": source.kind,
            "input": {"file": args.image, "sha256": sha},
            "settings": {"direction": direction, "k": k, "steps": args.steps, "num_images": args.num_images,
                         "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature,
                         "seed": args.seed, "device": args.device, "dtype": args.dtype},
            "images": [{"file": name, "seeds": result.seeds[i], "size": list(result.stitched[i].size)}
                       for i, name in enumerate(names)],
            "timings_s": {"load": round(loaded - start, 3), "outpaint": round(done - loaded, 3)},
        }
        return (json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")

    outputs = [(name, lambda im=im: png_bytes(im)) for name, im in zip(names, result.stitched)]
    write_run(out, [*outputs, (RESULTS, record)], previous)
    plural = "s" if len(names) != 1 else ""
    sys.stdout.write(f"wrote {len(names)} panorama{plural} and {RESULTS} to {out} ({PROG} outpaint)\n")
    return EXIT_OK


def add_outpaint(subparsers, common: argparse.ArgumentParser) -> None:
    from .checks import MAX_IMAGES, MAX_OUTPAINT_STEPS
    from .cli import DEFAULT_TOP_K, DTYPES

    p = subparsers.add_parser(
        "outpaint", parents=[common], help="extend a picture to the right or downwards",
        description="Extend IMG by K codes (8 px at 256 px) per step to the right or downwards, --steps times, "
                    "each new strip generated for TEXT and conditioned on the picture, and write the stitched "
                    "panoramas (image_000.png, ...) and results.json into --out. Left/up are not offered: the "
                    "model generates in raster order (flip the picture instead).",
        epilog="Exit status: 0 ok, 1 runtime failure, 2 bad command line, 130 interrupted.")
    p.add_argument("image", metavar="IMG", help="the picture to extend (any size; resized and centre-cropped)")
    p.add_argument("text", metavar="TEXT", help="the prompt for the new strips")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--right", type=int, default=None, metavar="K", help="add K code columns per step")
    where.add_argument("--down", type=int, default=None, metavar="K", help="add K code rows per step")
    p.add_argument("--steps", type=int, default=1, metavar="N", help=f"strips to add, in [1, {MAX_OUTPAINT_STEPS}]")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help=f"independent panoramas, in [1, {MAX_IMAGES}] (default: 1)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="panorama i, step j uses seed S + j * N + i (default: random, written to results.json)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help=f"default: {DEFAULT_TOP_K} or the vocabulary")
    p.add_argument("--top-p", type=float, default=0.995, metavar="P", help="in (0, 1] (default: 0.995)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="finite, > 0 (default: 1.0)")
    p.add_argument("--model", default=None, help="as for generate (default: demo if bundled, else Malevich)")
    p.add_argument("--out", default="rudalle_out", metavar="DIR", help="output directory (default: ./rudalle_out)")
    p.add_argument("--overwrite", action="store_true", help="replace the previous run in --out (as for generate)")
    p.add_argument("--device", default=None, metavar="D", help="cpu, cuda, cuda:N or mps, as available")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="generator precision (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="Hugging Face cache (default: the HF default)")
    p.set_defaults(func=cmd_outpaint)
