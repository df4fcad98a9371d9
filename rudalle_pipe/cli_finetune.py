"""The ``rudalle-pipe finetune`` verb: check the flags, the data and ``--out`` before any model loads,
finetune (see :mod:`rudalle_pipe.finetune`), and for a bundled or local pipeline write ``OUT/pipeline``,
the same chain with the finetuned generator, atomically. Registered in :data:`rudalle_pipe.cli.VERBS`;
the shared command-line helpers (``UsageError``, device checks) live in :mod:`rudalle_pipe.cli`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["cmd_finetune", "add_finetune"]

_FINETUNE_FLAGS = {"steps": "--steps", "lr": "--lr", "batch_size": "--batch-size", "train": "--train",
                   "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "mixed_precision": "--mixed-precision",
                   "optimizer": "--optimizer", "checkpoint_every": "--checkpoint-every", "seed": "--seed",
                   "gradient_checkpointing": "--gradient-checkpointing",
                   "gradient_accumulation_steps": "--gradient-accumulation-steps"}


def _finetune_usage(err: Exception) -> Exception:
    """A FinetuneConfig error as a command-line error naming the flag (``--lora-alpha``, not ``lora_alpha``)."""
    from .cli import UsageError, _one_line

    message = _one_line(err)
    field = message.split(" ", 1)[0].split("=", 1)[0]
    if field in _FINETUNE_FLAGS:
        message = _FINETUNE_FLAGS[field] + message[len(field):]
    return UsageError(message)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``rudalle-pipe finetune``: check everything, load the model, finetune on the folder, write
    OUT/final (+ OUT/pipeline, built atomically). A rerun after an interrupt resumes; one interrupted
    after OUT/final only writes the missing OUT/pipeline."""
    import dataclasses

    import torch

    from .cli import EXIT_OK, UsageError, _one_line, _resolve_device, default_model
    from .files import check_writable_dir
    from .finetune import FinetuneConfig, finetune, load_pairs
    from .pipeline import load_pipeline, resolve_pipeline
    from .train import runs
    from .train.common import is_main_process, wait_for_everyone

    name = args.model or default_model()
    try:
        _, directory = resolve_pipeline(name, what="model")
    except ValueError as err:
        raise UsageError(_one_line(err)) from err
    try:
        config = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                train=tuple(p.strip() for p in args.train.split(",") if p.strip()),
                                lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                gradient_checkpointing=args.gradient_checkpointing,
                                mixed_precision=args.mixed_precision, optimizer=args.optimizer,
                                checkpoint_every=args.checkpoint_every, seed=args.seed,
                                gradient_accumulation_steps=args.gradient_accumulation_steps)
    except (TypeError, ValueError) as err:
        raise _finetune_usage(err) from err
    if args.caption is not None and not args.caption.strip():
        raise UsageError("--caption is empty; give a caption, or leave it out to read captions.csv / <name>.txt")
    if args.dtype != "float32" and args.mixed_precision == "no":
        raise UsageError(f"--dtype {args.dtype} needs --mixed-precision fp16 or bf16 (half weights are frozen "
                         "and only train under autocast); or use --dtype float32")
    device = _resolve_device(args.device)
    out = Path(args.out)
    check_writable_dir(out, what="--out")  # an --out below a file or not writable: exit 1, as for generate
    final = out / "final"
    if (out / "pipeline").exists() or (final.exists() and directory is None):
        raise FileExistsError(f"{out / 'pipeline' if directory is not None else final} exists: this run has "
                              "finished; choose another --out")
    pairs = load_pairs(args.data, caption=args.caption, skip_bad=args.skip_bad)  # before any weights load
    pipe = load_pipeline(name, device=device, dtype=getattr(torch, args.dtype), clip=False, upscaler=False)
    if final.exists():  # interrupted after final/: only the pipeline is missing
        runs.check_record(out, runs.make_record(dataclasses.asdict(config), pairs, pipe.dalle))
        lines = [f"{final} was already written by an earlier run with these settings"]
    else:
        result = finetune(pipe.dalle, pipe.vae, pipe.tokenizer, pairs, out_dir=out, config=config,
                          progress=not args.no_progress)
        lines = [f"finetuned {name} on {len(pairs)} pictures for {config.steps} steps: loss "
                 f"{result.loss_before:.4f} -> {result.loss_after:.4f}"]
    lines.append(f"generator: {final}")
    main = is_main_process()  # under accelerate launch: one process exports and reports
    if directory is not None:  # a bundled or local pipeline: the same chain with the new generator
        target = out / "pipeline"
        if main:
            runs.export_pipeline(directory, final, target)
        lines.append(f"pipeline: {target}  (rudalle-pipe generate --model {target} \"TEXT\")")
    else:
        lines.append(f"load it with get_rudalle_model({str(final)!r}) in place of {name!r}")
    wait_for_everyone()
    if main:
        sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def add_finetune(subparsers, common: argparse.ArgumentParser) -> None:
    from .cli import DTYPES
    from .checks import TRAINABLE_PARTS

    p = subparsers.add_parser(
        "finetune", parents=[common], help="teach a generator your own pictures",
        description="Finetune the generator of --model on DATA: a folder of images with captions.csv "
                    "(columns file,caption), a <name>.txt per image, or --caption for all. Checkpoints, "
                    "loss_log.csv and final/ (the generator, Hugging Face layout) go to --out; rerunning "
                    "the same command resumes. For a bundled or local pipeline, --out/pipeline is the "
                    "same chain with the finetuned generator.",
        epilog="Exit status: 0 ok, 1 runtime failure (bad data files, a finished or different run in --out, an "
               "--out that cannot be written, ...), 2 bad command line. Both are checked before any model loads.")
    p.add_argument("data", metavar="DATA", help="folder of pictures (png, jpg, webp, bmp) and captions")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (resumes if it holds a checkpoint)")
    p.add_argument("--model", default=None,
                   help="a bundled pipeline, a Hub generator or a pipeline directory; default: demo if "
                        "bundled, else Malevich")
    p.add_argument("--caption", default=None, metavar="TEXT", help="one caption for every picture")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip pictures without a caption, with an empty caption or that do not decode (each is "
                        "listed in a warning); by default each is an error naming the file")
    p.add_argument("--steps", type=int, default=200, metavar="N",
                   help="optimizer steps, at most 10000000; a resume must keep it (default: 200)")
    p.add_argument("--lr", type=float, default=1e-4, metavar="LR", help="peak learning rate in (0, 10] (default: 1e-4)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="pictures per step and process, at most 4096; under accelerate launch with N processes a "
                        "step trains on N*B (default: 1)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="K",
                   help="batches summed into one optimizer step, at most 4096 (default: 1)")
    p.add_argument("--train", default="all", metavar="PARTS",
                   help=f"comma-separated parts that learn, from {', '.join(TRAINABLE_PARTS)} (default: all)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="LoRA adapters of rank R (at most 1024) on the attention/MLP linears of --train "
                        "(default: 0, off)")
    p.add_argument("--lora-alpha", type=float, default=16.0, metavar="A",
                   help="LoRA scale numerator, finite and > 0 (default: 16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast precision (default: no)")
    p.add_argument("--optimizer", choices=("adamw", "adafactor", "adamw8bit"), default="adamw",
                   help="adamw, adafactor (low memory) or adamw8bit (bitsandbytes, GPU) (default: adamw)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="save every N steps, at most 10000000 (default: 100)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="batch order and dropout, 0..4294967295 (default: 0)")
    p.add_argument("--device", default=None, metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="precision of the frozen weights; half needs --mixed-precision (default: float32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_finetune)
