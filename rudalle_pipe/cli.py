"""The ``rudalle-pipe`` command line (also ``python -m rudalle_pipe``).

Verbs:

* ``rudalle-pipe generate "TEXT" [options]`` runs the whole chain (load -> generate ->
  CLIP rerank -> Real-ESRGAN upscale) and writes PNGs, a contact sheet and ``results.json``.
  With ``--image-prompt IMG --borders SPEC|--mask MASK`` it keeps parts of a picture (see
  :mod:`rudalle_pipe.cli_image_prompt`); ``--paste-back`` restores the kept pixels in each decoded
  candidate before reranking, upscaling and the contact sheet.
* ``rudalle-pipe outpaint IMG TEXT --right K | --down K`` extends a picture and writes the stitched
  panoramas (:mod:`rudalle_pipe.cli_outpaint`).
* ``rudalle-pipe finetune DATA --out DIR [options]`` finetunes a generator on a folder of pictures
  (see :mod:`rudalle_pipe.finetune`) and, for a bundled or local pipeline, writes ``DIR/pipeline`` that
  ``generate --model DIR/pipeline`` uses.
* ``rudalle-pipe models`` lists what can be loaded and whether it is in the Hugging Face cache.

Exit status: 0 on success; 2 when the command line is wrong (argparse errors, invalid values such as
``--top-p 1.5``, an unknown ``--model``, a stage the chosen pipeline cannot run); 1 when running
fails (missing weights offline, output files that already exist, an ``--out`` that cannot be written or
lacks the room the run needs, any other error); 130 when interrupted. Errors are one line on stderr
(never empty) naming the flag as typed; ``-v`` adds tracebacks and INFO logs.

Adding a verb: write ``_add_<verb>(subparsers, common)`` that builds its subparser and sets
``func=<function(args) -> int>``, and append it to :data:`VERBS`. A large verb lives in its own module
(``finetune``: :mod:`rudalle_pipe.cli_finetune`) and imports the shared helpers here lazily.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .checks import one_line as _one_line  # light: the command line imports torch lazily
from .cli_finetune import add_finetune
from .cli_image_prompt import add_image_prompt_args
from .cli_outpaint import add_outpaint

logger = logging.getLogger(__name__)

__all__ = ["main", "UsageError", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

PROG = "rudalle-pipe"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
UPSCALE_CHOICES = ("x2", "x4", "x8", "none")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TOP_K = 2048  # clipped to the model's image vocabulary when that is smaller


class UsageError(Exception):
    """The command line is wrong: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _describe(err: BaseException) -> str:
    """One line for an error, never empty: the message, or the error's type when it has none."""
    return _one_line(err) or f"{type(err).__name__} (no message; -v shows the traceback)"


# ----------------------------------------------------------------------------------- generate
FLAGS = {"top_k": "--top-k", "top_p": "--top-p", "temperature": "--temperature", "num_images": "--num-images",
         "batch_size": "--batch-size", "seed": "--seed"}  # API argument -> its flag, for error messages


@dataclass
class _Source:
    """Where ``--model`` points, read without loading any weights."""

    name: str  # as given on the command line
    kind: str  # "bundled", "directory" or "hub"
    image_vocab: int  # generator's image vocabulary (top_k upper bound)
    upscale_scales: Optional[tuple[int, ...]]  # scales available locally; None = any Hub scale
    has_clip: bool  # a CLIP reranker can be loaded
    image_side: int  # side in px of a generated image (before upscaling)
    vae_resolution: int = 256  # px the VQGAN encodes an image prompt at
    vae_factor: int = 8  # px per code side (the prompt grid is vae_resolution / vae_factor codes a side)


def default_model() -> str:
    """``"demo"`` when that bundled pipeline exists, else ``"Malevich"``."""
    from .pipeline import list_pipelines

    return "demo" if "demo" in list_pipelines() else "Malevich"


def _resolve_model(name: str) -> _Source:
    from .dalle import DalleConfig
    from .hub import read_config
    from .pipeline import resolve_pipeline
    from .registry import PRETRAINED
    from .vae import VQGANConfig

    try:
        kind, directory = resolve_pipeline(name, what="model")
    except ValueError as err:
        raise UsageError(f"--model: {err}") from err
    if directory is None:  # a Hub generator preset: the 256 px Sber VQGAN
        dalle = DalleConfig(**PRETRAINED[name].config)
        vqgan = VQGANConfig()
        return _Source(name, kind, dalle.image_vocab_size, None, True,
                       dalle.image_tokens_per_dim * vqgan.downsample_factor, vqgan.resolution,
                       vqgan.downsample_factor)
    dalle = read_config(directory / "dalle", DalleConfig, model_type="rudalle")
    vae = read_config(directory / "vae", VQGANConfig, model_type="vqgan")
    side = dalle.image_tokens_per_dim * vae.downsample_factor * (2 if vae.dwt else 1)
    scales: tuple[int, ...] = ()
    if (directory / "upscaler").is_dir():
        from .realesrgan import RRDBNetConfig

        scales = (read_config(directory / "upscaler", RRDBNetConfig, model_type="rrdbnet").scale,)
    return _Source(name, kind, dalle.image_vocab_size, scales, (directory / "clip").is_dir(), side, vae.resolution,
                   vae.downsample_factor)


def _resolve_device(device: Optional[str]) -> str:
    """``device`` if this torch can run on it (cpu; cuda, cuda:N and mps when available), else a
    :class:`UsageError` listing the valid choices; ``None`` picks cuda if available, else cpu."""
    import torch

    cuda = torch.cuda.is_available()
    if device is None:
        return "cuda" if cuda else "cpu"
    choices = ["cpu"]
    if cuda:
        choices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices += ["mps", "mps:0"]
    if device not in choices:
        raise UsageError(f"--device {device!r} is not a device this torch can run on; valid choices: "
                         f"{', '.join(choices)}")
    return device


def _check_text(flag: str, value: str) -> None:
    """Refuse text that is not valid UTF-8 (undecodable argv bytes arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ord(value[err.start])
        what = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise UsageError(f"{flag} is not valid UTF-8 ({what} at character {err.start}); pass UTF-8 text") from None


def _check_generate_args(args: argparse.Namespace) -> tuple[_Source, list[str]]:
    """Validate everything that needs no weights; return the model source and the image file names."""
    from .generation import check_sampling_args
    from .outputs import image_name

    _check_text("TEXT", args.text)
    if not args.text.strip():
        raise UsageError("TEXT is empty; give a prompt, e.g. rudalle-pipe generate 'рыжий котик'")
    if args.model is not None:
        _check_text("--model", args.model)  # recorded in results.json
    source = _resolve_model(args.model or default_model())
    if args.top_k is None:
        args.top_k = min(DEFAULT_TOP_K, source.image_vocab)
    try:  # counts are bounded (checks.MAX_IMAGES), floats finite
        check_sampling_args(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                            vocab=source.image_vocab, num_images=args.num_images, batch_size=args.batch_size,
                            seed=args.seed, names=FLAGS)
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    if args.rerank is not None and not 0 <= args.rerank <= args.num_images:
        raise UsageError(f"--rerank must be in [0, --num-images={args.num_images}] (0 disables reranking), "
                         f"got {args.rerank}")
    if args.rerank and not source.has_clip:
        raise UsageError(f"--rerank {args.rerank}: pipeline {source.name!r} has no CLIP reranker; "
                         f"use --rerank 0")
    if args.rerank is None:  # default: sort all candidates when a reranker exists
        args.rerank = args.num_images if source.has_clip else 0
    scales = source.upscale_scales
    if args.upscale is None:  # default: the pipeline's own upscaler (x4 for Hub models)
        args.upscale = "x4" if scales is None else (f"x{scales[0]}" if scales else "none")
    elif args.upscale != "none" and scales is not None and int(args.upscale[1:]) not in scales:
        available = ", ".join([f"x{s}" for s in scales] + ["none"])
        raise UsageError(f"--upscale {args.upscale}: pipeline {source.name!r} has no such upscaler; "
                         f"available: {available}")
    args.device = _resolve_device(args.device)
    return source, [image_name(i) for i in range(args.rerank or args.num_images)]


def _check_out(args: argparse.Namespace, source: _Source, names: list[str]) -> frozenset[str]:
    """Before loading any model: no file would be replaced that may not be, and ``--out`` is (or can
    become) a writable folder with room for the run. Returns the previous run's files (see outputs)."""
    from .files import check_writable_dir
    from .outputs import check_targets, estimate_bytes

    out = Path(args.out)
    previous = check_targets(out, names, overwrite=args.overwrite)
    scale = 1 if args.upscale == "none" else int(args.upscale[1:])
    needed = estimate_bytes(num_images=args.num_images, kept=len(names), side=source.image_side, scale=scale,
                            text=args.text)
    check_writable_dir(out, needed_bytes=needed, what="--out")
    return previous


def _finite_or_none(value: Optional[float], what: str) -> Optional[float]:
    """JSON has no NaN/inf: such a number is written as null, with a warning."""
    if value is None or math.isfinite(value):
        return value
    logger.warning("%s is %s; written as null in results.json", what, value)
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    """``rudalle-pipe generate``: the whole chain, written into ``--out``."""
    import torch

    from .cli_image_prompt import apply_paste_back, build_prompt, check_image_prompt_args, prompt_record
    from .clip import cherry_pick_by_clip
    from .generation import generate_images
    from .hub import WeightsNotFoundError
    from .outputs import CONTACT_SHEET, RESULTS, png_bytes, sheet_columns, write_run
    from .pipeline import load_pipeline
    from .realesrgan import super_resolution
    from .show import image_grid

    source, names = _check_generate_args(args)
    spec = check_image_prompt_args(args, source)
    previous = _check_out(args, source, names)
    out = Path(args.out)
    progress = not args.no_progress
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1. load the models (only the stages that will run)
    tick = time.perf_counter()
    upscaler = False if args.upscale == "none" else (args.upscale if source.kind == "hub" else True)
    try:
        pipe = load_pipeline(source.name, device=args.device, dtype=getattr(torch, args.dtype),
                             cache_dir=args.cache_dir, clip=args.rerank > 0, upscaler=upscaler)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} (`{PROG} models` shows what is cached; --rerank 0 and "
                                   f"--upscale none skip the CLIP and the upscaler)") from err
    timings["load"] = time.perf_counter() - tick
    logger.info("loaded %s on %s in %.1f s", source.name, args.device, timings["load"])

    # 2. sample the candidates (with --paste-back, the kept pixels go back in BEFORE rerank and upscale)
    tick = time.perf_counter()
    prompt = None if spec is None else build_prompt(spec, pipe.vae)
    gen = generate_images(args.text, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=args.top_k, top_p=args.top_p,
                          num_images=args.num_images, temperature=args.temperature, batch_size=args.batch_size,
                          seed=args.seed, progress=progress, image_prompt=prompt)
    candidates = gen.images if spec is None else apply_paste_back(gen.images, spec, prompt)
    timings["generate"] = time.perf_counter() - tick
    perplexities = [_finite_or_none(p, f"the perplexity of candidate {i}") for i, p in enumerate(gen.perplexities)]

    # 3. rerank with CLIP and keep the best --rerank (or keep all, in generation order)
    tick = time.perf_counter()
    scores: list[Optional[float]] = [None] * args.num_images
    order = list(range(args.num_images))
    if args.rerank:
        ranked = cherry_pick_by_clip(candidates, args.text, pipe.clip, batch_size=args.batch_size,
                                     progress=progress)  # all candidates: dropped ones get a score too
        order = ranked.indices[: args.rerank]
        for i, score in zip(ranked.indices, ranked.scores):
            scores[i] = _finite_or_none(score, f"the CLIP score of candidate {i}")
    timings["rerank"] = time.perf_counter() - tick

    # 4. upscale the kept images
    tick = time.perf_counter()
    kept = [candidates[i] for i in order]
    if args.upscale != "none":
        if pipe.upscaler is None or pipe.upscaler.scale != int(args.upscale[1:]):
            raise RuntimeError(f"pipeline {source.name!r} did not provide an {args.upscale} upscaler")
        kept = super_resolution(kept, pipe.upscaler, progress=progress)
    timings["upscale"] = time.perf_counter() - tick

    # 5. images, contact sheet, then results.json (the completion record): each written under a
    #    temporary name, then all renamed into place; a failure leaves no file of this run (see outputs)
    tick = time.perf_counter()
    nrow = sheet_columns(args.num_images)

    def record() -> bytes:
        timings["save"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        results = {
            "text": args.text,
            "model": source.name,
            "model_kind": source.kind,
            "settings": {"top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature,
                         "num_images": args.num_images, "seed": args.seed, "batch_size": args.batch_size,
                         "rerank": args.rerank, "upscale": args.upscale, "device": args.device,
                         "dtype": args.dtype},
            "images": [{"file": name, "seed": gen.seeds[i], "perplexity": perplexities[i], "clip_score": scores[i],
                        "index": i, "size": list(image.size)} for name, i, image in zip(names, order, kept)],
            "candidates": [{"index": i, "seed": gen.seeds[i], "perplexity": perplexities[i],
                            "clip_score": scores[i]} for i in range(args.num_images)],
            "contact_sheet": {"file": CONTACT_SHEET, "nrow": nrow, "order": "candidate index"},
            **({} if spec is None else {"image_prompt": prompt_record(spec, prompt)}),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        return (json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")

    outputs = [(name, lambda image=image: png_bytes(image)) for name, image in zip(names, kept)]
    outputs += [(CONTACT_SHEET, lambda: png_bytes(image_grid(candidates, nrow=nrow))), (RESULTS, record)]
    write_run(out, outputs, previous)
    plural = "s" if len(kept) != 1 else ""
    sys.stdout.write(f"wrote {len(kept)} image{plural}, {CONTACT_SHEET} and {RESULTS} to {out}\n")
    return EXIT_OK


def _add_generate(subparsers, common: argparse.ArgumentParser) -> None:
    from .checks import MAX_IMAGES

    p = subparsers.add_parser(
        "generate", parents=[common], help="text -> images: generate, rerank, upscale, save",
        description="Generate images for TEXT with the whole chain: load -> generate -> CLIP rerank -> "
                    "Real-ESRGAN upscale, and write PNGs (best first), contact_sheet.png (all candidates) "
                    "and results.json into --out. Every argument, the folder and its free space are checked "
                    "before any model loads. results.json is written last and lists the run's files; a failed "
                    "or interrupted run leaves none of its files behind.",
        epilog="Exit status: 0 ok, 1 runtime failure (missing weights, existing files, --out not writable or "
               "too full, ...), 2 bad command line, 130 interrupted.")
    p.add_argument("text", metavar="TEXT", help="the prompt (Russian for the ruDALL-E models)")
    p.add_argument("--model", default=None,
                   help="a bundled pipeline, a Hub generator (see `rudalle-pipe models`) or a pipeline "
                        "directory; default: demo if bundled, else Malevich")
    p.add_argument("--num-images", type=int, default=4, metavar="N",
                   help=f"candidates to generate, in [1, {MAX_IMAGES}] (default: 4)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"keep the K most likely codes (default: {DEFAULT_TOP_K}, or the model's image vocabulary "
                        "if smaller)")
    p.add_argument("--top-p", type=float, default=0.995, metavar="P",
                   help="nucleus threshold in (0, 1] (default: 0.995)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="finite, > 0 (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="candidate i uses seed S+i (default: random seeds, written to results.json)")
    p.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="keep the N best candidates by CLIP score; 0 disables reranking (default: sort all "
                        "candidates when the pipeline has a CLIP)")
    p.add_argument("--upscale", choices=UPSCALE_CHOICES, default=None,
                   help="Real-ESRGAN factor for the kept images (default: the pipeline's upscaler, x4 for Hub "
                        "models; none if it has none)")
    p.add_argument("--out", default="rudalle_out", metavar="DIR", help="output directory (default: ./rudalle_out)")
    p.add_argument("--device", default=None, metavar="D",
                   help="cpu, cuda, cuda:N or mps, as available here (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="generator precision (default: float32)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help=f"images per forward pass, in [1, {MAX_IMAGES}] (default: 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the previous run in --out: the files its results.json lists are replaced or "
                        "removed (stale images of a larger run too); any other file is never touched, and a file "
                        "with a name this run writes that no results.json lists is refused")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="Hugging Face cache (default: the HF default)")
    add_image_prompt_args(p)
    p.set_defaults(func=cmd_generate)


# ------------------------------------------------------------------------------------- models
def _cached(repo_ids: Sequence[str], filename: str, cache_dir: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(r, filename, cache_dir=cache_dir), str) for r in repo_ids)


def _model_rows(cache_dir: Optional[str]) -> list[tuple[str, str, str, str, str]]:
    """``(name, kind, repo, file, cached)`` for everything ``generate`` can load."""
    from .pipeline import BUNDLED_DIR, list_pipelines
    from .registry import PRETRAINED, list_pretrained

    kinds = {"dalle": "generator", "tokenizer": "tokenizer", "vae": "vqgan", "realesrgan": "upscaler"}
    hub = list_pretrained("dalle")
    rows = [(name, "pipeline", "(bundled)", str(BUNDLED_DIR / name), "bundled")
            for name in list_pipelines() if name not in hub]
    for name, entry in PRETRAINED.items():
        repos = (entry.repo_id, *entry.fallback_repo_ids)
        rows.append((name, kinds[entry.kind], entry.repo_id, entry.filename,
                     "yes" if _cached(repos, entry.filename, cache_dir) else "no"))
    try:
        import open_clip

        from .clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
    except ImportError:  # open_clip is a dependency, but listing must not depend on it
        return rows
    repo = (open_clip.get_pretrained_cfg(DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED).get("hf_hub") or "").strip("/")
    if repo:
        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        found = [f for f in files if _cached([repo], f, cache_dir)]
        rows.append(("clip", "reranker", repo, (found or files)[0], "yes" if found else "no"))
    text_repo = (open_clip.get_model_config(DEFAULT_CLIP_MODEL) or {}).get("text_cfg", {}).get("hf_model_name")
    if text_repo:
        for filename in ("config.json", "tokenizer.json"):
            rows.append(("clip_text", "reranker", text_repo, filename,
                         "yes" if _cached([text_repo], filename, cache_dir) else "no"))
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    """``rudalle-pipe models``: an aligned table on stdout."""
    from huggingface_hub import constants

    header = ("NAME", "KIND", "REPO", "FILE", "CACHED")
    rows = [header, *_model_rows(args.cache_dir)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    offline = " (HF_HUB_OFFLINE: cache only)" if constants.HF_HUB_OFFLINE else ""
    lines = [f"Hugging Face cache: {args.cache_dir or constants.HF_HUB_CACHE}{offline}",
             f"default --model: {default_model()}", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += ["", "generate --model takes a pipeline or generator above, or a pipeline directory "
                  "(save_pipeline); the Hub generators also load the tokenizer, vqgan, clip and upscaler."]
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _add_models(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("models", parents=[common], help="list loadable models and whether they are cached",
                              description="List the bundled pipelines, Hub generators, tokenizer, VQGANs, "
                                          "upscalers and the default CLIP, with their Hub repo and file and "
                                          "whether each is already in the Hugging Face cache.")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="Hugging Face cache (default: the HF default)")
    p.set_defaults(func=cmd_models)


# --------------------------------------------------------------------------------------- main
VERBS: list[Callable[..., None]] = [_add_generate, add_outpaint, add_finetune, _add_models]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="INFO logs and tracebacks on stderr")
    parser = _Parser(prog=PROG, description="ruDALL-E text-to-image generation from the command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in VERBS:
        add(subparsers, common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    args = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("rudalle_pipe")
    old_level, old_propagate = package_logger.level, package_logger.propagate
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING)
    package_logger.propagate = False  # a root handler (open_clip's logging.info() installs one) would repeat them
    hub_logger = logging.getLogger("huggingface_hub")  # its retry/warning lines would bury our one-line error
    old_hub_level = hub_logger.level
    hub_logger.setLevel(logging.CRITICAL)
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            package_logger.setLevel(logging.INFO)
            hub_logger.setLevel(old_hub_level)
        return args.func(args)
    except SystemExit as exit_:  # --help / --version
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    except UsageError as err:
        sys.stderr.write(f"{PROG}: error: {_describe(err)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (traceback with -v)
        if args is not None and args.verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"{PROG}: error: {_describe(err)}\n")
        return EXIT_FAILURE
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        package_logger.propagate = old_propagate
        hub_logger.setLevel(old_hub_level)
