"""``rudalle-pipe generate TEXT [TEXT ...]``: load -> generate -> rerank -> upscale -> write.

* Several TEXT arguments: ``--num-images`` candidates per prompt; with ``--seed S`` candidate ``j`` of
  prompt ``i`` gets seed ``S + i * num_images + j`` (the library's rule). Each prompt's candidates are
  reranked among themselves and its best ``--rerank`` are kept. With one TEXT the files are
  ``image_000.png, ...``; with several, ``prompt00_image_000.png, ...`` (prompt index, then rank).
* Guidance: ``--guidance-scale S`` (1 = none) and ``--negative-prompt TEXT`` (only with S != 1) are
  passed to :func:`rudalle_pipe.generate_images`, which documents them.
* Ranking (``--rank-by``): ``clip`` (CLIP cosine similarity; the default when the pipeline has a CLIP),
  ``perplexity`` (the generator's own perplexity, ascending, as the original ruDALL-E ranked; the
  default without a CLIP: it needs none) or ``combined`` (``--rank-weight`` is CLIP's share, see
  :func:`rudalle_pipe.ranking.combine_scores`). ``--rerank 0`` keeps every candidate in generation order.
* ``results.json`` carries every score of every candidate: ``perplexity``, ``clip_score`` and
  ``combined`` (null where not computed: no CLIP loaded, or a non-finite number) and ``rank`` (1 = best
  within its prompt; null with ``--rerank 0``), plus ``prompt_index`` and the prompt of each kept image.

Every argument, the output folder and its free space are checked before any model loads (exit 2 for
a bad command line, see :mod:`rudalle_pipe.cli`). ``--prompts FILE`` (instead of TEXT) runs the chain once per
prompt of a file, on one process or several: :mod:`rudalle_pipe.prompt_file`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["add_generate", "cmd_generate", "RANK_BY"]

RANK_BY = ("clip", "perplexity", "combined")  # rudalle_pipe.ranking.RANK_BY (not imported: it pulls in torch)


def _check_rank_args(args: argparse.Namespace, source) -> None:
    """--rerank, --rank-by and --rank-weight: defaults filled in, combinations that would have no
    effect or need a missing CLIP refused."""
    from .checks import check_float
    from .cli import UsageError, _one_line

    if args.rerank is not None and not 0 <= args.rerank <= args.num_images:
        raise UsageError(f"--rerank must be in [0, --num-images={args.num_images}] (0 disables reranking), "
                         f"got {args.rerank}")
    if args.rerank == 0 and (args.rank_by is not None or args.rank_weight is not None):
        flag = "--rank-by" if args.rank_by is not None else "--rank-weight"
        raise UsageError(f"{flag} has no effect with --rerank 0 (candidates kept in generation order); drop one")
    if args.rank_by in ("clip", "combined") and not source.has_clip:
        raise UsageError(f"--rank-by {args.rank_by}: pipeline {source.name!r} has no CLIP reranker; use "
                         "--rank-by perplexity (it needs no CLIP) or --rerank 0")
    if args.rerank is None:  # default: sort all candidates (perplexity needs no CLIP)
        args.rerank = args.num_images
    if args.rank_by is None and args.rerank:
        args.rank_by = "clip" if source.has_clip else "perplexity"
    if args.rank_weight is not None:
        if args.rank_by != "combined":
            raise UsageError(f"--rank-weight is CLIP's share of the combined score; it needs --rank-by combined "
                             f"(ranking by {args.rank_by} here)")
        try:
            check_float("--rank-weight", args.rank_weight, low=0, high=1)
        except ValueError as err:
            raise UsageError(_one_line(err)) from err


def _check_guidance_args(args: argparse.Namespace) -> None:
    """--guidance-scale in (0, MAX_GUIDANCE]; --negative-prompt: UTF-8, not blank, only with guidance."""
    from .cli import UsageError, _check_text, _one_line
    from .generation import check_guidance

    if args.negative_prompt is not None:
        _check_text("--negative-prompt", args.negative_prompt)
    try:
        check_guidance(args.guidance_scale, args.negative_prompt,
                       names={"guidance_scale": "--guidance-scale", "negative_prompt": "--negative-prompt"})
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err


def _check_generate_args(args: argparse.Namespace):
    """Validate everything that needs no weights; return the model source and the image file names."""
    from .checks import MAX_IMAGES, check_int
    from .cli import (DEFAULT_TOP_K, FLAGS, UsageError, _check_text, _one_line, _resolve_device, _resolve_model,
                      default_model)
    from .generation import check_sampling_args
    from .outputs import image_name

    several = len(args.text) > 1
    for i, text in enumerate(args.text):
        flag = f"TEXT {i + 1}" if several else "TEXT"
        _check_text(flag, text)
        if not text.strip():
            raise UsageError(f"{flag} is empty; give a prompt, e.g. rudalle-pipe generate 'рыжий котик'")
    if args.model is not None:
        _check_text("--model", args.model)  # recorded in results.json
    source = _resolve_model(args.model or default_model())
    if args.top_k is None:
        args.top_k = min(DEFAULT_TOP_K, source.image_vocab)
    total = len(args.text) * args.num_images
    try:  # counts are bounded (checks.MAX_IMAGES), floats finite
        check_sampling_args(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                            vocab=source.image_vocab, num_images=args.num_images, batch_size=args.batch_size,
                            seed=args.seed, names=FLAGS)
        if several:
            check_int(f"--num-images ({args.num_images}) x {len(args.text)} TEXTs", total, high=MAX_IMAGES)
            if args.seed is not None:
                from .generation import _MAX_SEED

                check_int("--seed", args.seed, low=0, high=_MAX_SEED - total)
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    _check_rank_args(args, source)
    _check_guidance_args(args)
    _resolve_upscale(args, source)
    args.device = _resolve_device(args.device)
    kept = args.rerank or args.num_images
    names = [image_name(j, prompt=i if several else None) for i in range(len(args.text)) for j in range(kept)]
    return source, names


def _resolve_upscale(args: argparse.Namespace, source) -> None:
    """--upscale: the pipeline's own upscaler by default (x4 for Hub models); a factor it lacks is refused."""
    from .cli import UsageError

    scales = source.upscale_scales
    if args.upscale is None:
        args.upscale = "x4" if scales is None else (f"x{scales[0]}" if scales else "none")
    elif args.upscale != "none" and scales is not None and int(args.upscale[1:]) not in scales:
        available = ", ".join([f"x{s}" for s in scales] + ["none"])
        raise UsageError(f"--upscale {args.upscale}: pipeline {source.name!r} has no such upscaler; "
                         f"available: {available}")


def _check_out(args: argparse.Namespace, source, names: list[str]) -> frozenset[str]:
    """Before loading any model: no file would be replaced that may not be, and ``--out`` is (or can
    become) a writable folder with room for the run. Returns the previous run's files (see outputs)."""
    from .files import check_writable_dir
    from .outputs import check_targets, estimate_bytes

    out = Path(args.out)
    previous = check_targets(out, names, overwrite=args.overwrite)
    scale = 1 if args.upscale == "none" else int(args.upscale[1:])
    needed = estimate_bytes(num_images=len(args.text) * args.num_images, kept=len(names), side=source.image_side,
                            scale=scale, text="".join(args.text))
    check_writable_dir(out, needed_bytes=needed, what="--out")
    return previous


def _finite_or_none(value: Optional[float], what: str) -> Optional[float]:
    """JSON has no NaN/inf: such a number is written as null, with a warning."""
    if value is None or math.isfinite(value):
        return value
    logger.warning("%s is %s; written as null in results.json", what, value)
    return None


def _generate(args: argparse.Namespace, pipe, prompt, progress: bool):
    """Every prompt's candidates: ``(images, perplexities, seeds, prompt_index)``, prompt 0's first;
    candidate ``j`` of prompt ``i`` has seed ``--seed + i * num_images + j``."""
    from .generation import generate_images

    n = args.num_images
    text = args.text[0] if len(args.text) == 1 else list(args.text)  # rows of all prompts share batches
    gen = generate_images(text, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=args.top_k, top_p=args.top_p,
                          num_images=n, temperature=args.temperature, batch_size=args.batch_size, seed=args.seed,
                          progress=progress, image_prompt=prompt, guidance_scale=args.guidance_scale,
                          negative_prompt=args.negative_prompt)
    prompt_index = [i for i in range(len(args.text)) for _ in range(n)]  # prompt 0's images first
    return gen.images, gen.perplexities, gen.seeds, prompt_index


def _rank(args: argparse.Namespace, pipe, candidates, perplexities, progress: bool) -> tuple[list[int], dict]:
    """Rerank each prompt's candidates; returns the kept candidates' global indices (prompt 0's best
    first) and the scores of every candidate: ``{"clip_score"|"combined"|"rank": [one per candidate]}``."""
    from .clip import cherry_pick_by_clip  # looked up at call time (tests spy on it)

    n, total = args.num_images, len(candidates)
    scores: dict[str, list[Any]] = {key: [None] * total for key in ("clip_score", "combined", "rank")}
    if not args.rerank:
        return list(range(total)), scores
    kept: list[int] = []
    for i, text in enumerate(args.text):
        first = i * n
        ppl = perplexities[first:first + n]
        if not all(p is not None and p > 0 for p in ppl):  # a non-finite perplexity (already warned about)
            if args.rank_by != "clip":
                raise RuntimeError(f"the generator gave a non-finite perplexity for a candidate of prompt {i} "
                                   f"({text!r}), so it cannot rank by {args.rank_by}; use --rank-by clip")
            ppl = None
        clip = pipe.clip if args.rank_by != "perplexity" else None
        ranked = cherry_pick_by_clip(candidates[first:first + n], text, clip, batch_size=args.batch_size,
                                     progress=progress, by=args.rank_by, perplexities=ppl,
                                     weight=args.rank_weight)
        for rank, j in enumerate(ranked.indices):
            scores["rank"][first + j] = rank + 1
            for key, values in (("clip_score", ranked.clip_scores), ("combined", ranked.combined)):
                if values is not None:
                    scores[key][first + j] = _finite_or_none(values[rank], f"the {key} of candidate {first + j}")
        kept += [first + j for j in ranked.indices[: args.rerank]]
    return kept, scores


def candidate_entries(prompt_index: Sequence[int], seeds: Sequence[int], perplexities: Sequence[Optional[float]],
                      scores: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """results.json's entry of every candidate, in generation order: index, prompt, seed and scores."""
    return [{"index": i, "prompt_index": prompt_index[i], "seed": seeds[i], "perplexity": perplexities[i],
             "clip_score": scores["clip_score"][i], "combined": scores["combined"][i], "rank": scores["rank"][i]}
            for i in range(len(seeds))]


def results_record(args: argparse.Namespace, *, header: dict[str, Any], settings: dict[str, Any],
                   entries: list[dict[str, Any]], kept: Sequence[tuple[str, int, Any]], image_prompt: Optional[dict],
                   timings: dict[str, float], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ``results.json`` of a run (``generate``'s folder, and the web page's zip): the prompts, ``header``
    (the model), ``settings``, ``images`` best first (``kept``: ``(file, candidate index, kept image)``), any
    ``extra`` entries, every candidate (:func:`candidate_entries`), the contact sheet, the image prompt and
    the timings."""
    from .contact_sheet import sheet_columns
    from .outputs import CONTACT_SHEET

    return {
        "text": args.text[0] if len(args.text) == 1 else None,  # one prompt; "prompts" lists them all
        "prompts": list(args.text),
        **header,
        "settings": settings,
        "images": [{"file": name, **entries[i], "prompt": args.text[entries[i]["prompt_index"]],
                    "size": list(image.size)} for name, i, image in kept],
        **(extra or {}),
        "candidates": entries,
        "contact_sheet": {"file": CONTACT_SHEET, "nrow": sheet_columns(len(entries)), "order": "candidate index"},
        **({} if image_prompt is None else {"image_prompt": image_prompt}),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _sheet_label(args: argparse.Namespace, entry: dict[str, Any]) -> str:
    """Two lines under a candidate on the contact sheet: its index (and prompt), its rank, and the score
    it was ranked by (the perplexity when nothing ranked it)."""
    head = f"#{entry['index']}" + (f" prompt {entry['prompt_index']}" if len(args.text) > 1 else "")
    if entry["rank"] is not None:
        head += f"  rank {entry['rank']}/{args.num_images}"
    by = args.rank_by if args.rerank else "perplexity"
    value = entry["clip_score" if by == "clip" else by]
    return f"{head}\n{by} {'n/a' if value is None else f'{value:.3f}'}"


def cmd_generate(args: argparse.Namespace) -> int:
    """``rudalle-pipe generate``: the whole chain, written into ``--out``."""
    from .cli import PROG, EXIT_OK, _load_pipeline
    from .cli_image_prompt import check_image_prompt_args
    from .hub import WeightsNotFoundError
    from .outputs import CONTACT_SHEET, RESULTS

    if args.prompts is not None:  # many prompts, one process or several: see prompt_file
        from .prompt_file import cmd_generate_prompts

        return cmd_generate_prompts(args)
    if not args.text:
        from .cli import UsageError

        raise UsageError("give a TEXT to draw, e.g. rudalle-pipe generate 'рыжий котик', or --prompts FILE")
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
    need_clip = bool(args.rerank) and args.rank_by in ("clip", "combined")
    try:
        pipe = _load_pipeline(source.name, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir,
                              clip=need_clip, upscaler=upscaler)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} (`{PROG} models` shows what is cached; --rank-by perplexity or "
                                   "--rerank 0, and --upscale none skip the CLIP and the upscaler)") from err
    timings["load"] = time.perf_counter() - tick
    logger.info("loaded %s on %s in %.1f s", source.name, args.device, timings["load"])
    kept = run_chain(args, source, pipe, names, out, previous, spec=spec, progress=progress, timings=timings,
                     start=start)
    plural = "s" if kept != 1 else ""
    sys.stdout.write(f"wrote {kept} image{plural}, {CONTACT_SHEET} and {RESULTS} to {out}\n")
    return EXIT_OK


def run_chain(args: argparse.Namespace, source, pipe, names: list[str], out: Path, previous: frozenset[str], *,
              spec=None, progress: bool, timings: dict[str, float], start: float) -> int:
    """Steps 2-5 of ``generate`` on a loaded ``pipe``: sample ``args.text``'s candidates, rerank, upscale
    and write ``names``, the contact sheet and results.json into ``out``; returns how many images were kept.
    (``rudalle-pipe generate --prompts`` runs it once per prompt, see :mod:`rudalle_pipe.prompt_file`.)"""
    from .cli_image_prompt import apply_paste_back, build_prompt, prompt_record
    from .contact_sheet import contact_sheet
    from .outputs import CONTACT_SHEET, RESULTS, png_bytes, write_run
    from .realesrgan import super_resolution

    # 2. sample the candidates (with --paste-back, the kept pixels go back in BEFORE rerank and upscale)
    tick = time.perf_counter()
    prompt = None if spec is None else build_prompt(spec, pipe.vae)
    images, raw_ppl, seeds, prompt_index = _generate(args, pipe, prompt, progress)
    candidates = images if spec is None else apply_paste_back(images, spec, prompt)
    timings["generate"] = time.perf_counter() - tick
    perplexities = [_finite_or_none(p, f"the perplexity of candidate {i}") for i, p in enumerate(raw_ppl)]

    # 3. rank each prompt's candidates and keep its best --rerank (or keep all, in generation order)
    tick = time.perf_counter()
    order, scores = _rank(args, pipe, candidates, perplexities, progress)
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
    entries = candidate_entries(prompt_index, seeds, perplexities, scores)

    def record() -> bytes:
        timings["save"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        settings = {k: getattr(args, k) for k in ("top_k", "top_p", "temperature", "num_images", "seed", "batch_size",
                                                   "guidance_scale", "negative_prompt", "rerank", "rank_by",
                                                   "rank_weight", "upscale", "device", "dtype")}
        results = results_record(args, header={"model": source.name, "model_kind": source.kind}, settings=settings,
                                 entries=entries, kept=list(zip(names, order, kept)),
                                 image_prompt=None if spec is None else prompt_record(spec, prompt), timings=timings)
        return (json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")

    outputs = [(name, lambda image=image: png_bytes(image)) for name, image in zip(names, kept)]
    labels = [_sheet_label(args, entry) for entry in entries]
    outputs += [(CONTACT_SHEET, lambda: png_bytes(contact_sheet(candidates, labels))), (RESULTS, record)]
    write_run(out, outputs, previous)
    return len(kept)


def add_generate(subparsers, common: argparse.ArgumentParser) -> None:
    """The ``generate`` subparser."""
    from .checks import MAX_IMAGES
    from .cli import DEFAULT_TOP_K, DTYPES, UPSCALE_CHOICES
    from .cli_image_prompt import add_image_prompt_args

    p = subparsers.add_parser(
        "generate", parents=[common], help="text -> images: generate, rerank, upscale, save",
        description="Generate images for each TEXT with the whole chain: load -> generate -> rerank (CLIP, the "
                    "generator's perplexity, or both) -> Real-ESRGAN upscale, and write PNGs (best first), "
                    "contact_sheet.png (all candidates) and results.json (every score of every candidate) into "
                    "--out. Every argument, the folder and its free space are checked before any model loads. "
                    "results.json is written last and lists the run's files; a failed or interrupted run leaves "
                    "none of its files behind.",
        epilog="Exit status: 0 ok, 1 runtime failure (missing weights, existing files, --out not writable or "
               "too full, ...), 2 bad command line, 130 interrupted.")
    p.add_argument("text", metavar="TEXT", nargs="*",
                   help="the prompt (Russian for the ruDALL-E models); several prompts get --num-images each, "
                        "written as promptII_image_NNN.png")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="instead of TEXT: a text file (one prompt a line) or .jsonl (per prompt: text, num_images, "
                        "seed, negative_prompt, guidance_scale); each prompt goes to --out/<index>-<slug>/, with "
                        "--out/results.jsonl and run.json; a rerun resumes; runs on several processes under "
                        "accelerate launch or torchrun")
    p.add_argument("--model", default=None,
                   help="a bundled pipeline, a Hub generator (see `rudalle-pipe models`) or a pipeline "
                        "directory; default: demo if bundled, else Malevich")
    p.add_argument("--num-images", type=int, default=4, metavar="N",
                   help=f"candidates per prompt, in [1, {MAX_IMAGES}] (all prompts together at most {MAX_IMAGES}; "
                        "default: 4)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"keep the K most likely codes (default: {DEFAULT_TOP_K}, or the model's image vocabulary "
                        "if smaller)")
    p.add_argument("--top-p", type=float, default=0.995, metavar="P",
                   help="nucleus threshold in (0, 1] (default: 0.995)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="finite, > 0 (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="candidate j of prompt i uses seed S + i*N + j (default: random seeds, written to "
                        "results.json)")
    p.add_argument("--guidance-scale", type=float, default=1.0, metavar="S",
                   help="classifier-free guidance scale in (0, 50]: 1 = none (default); 2-5 follow the prompt "
                        "more strictly, at about twice the compute per image")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="with --guidance-scale != 1: guide away from TEXT instead of the empty text")
    p.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="keep the N best candidates of each prompt (see --rank-by); 0 keeps all in generation "
                        "order (default: sort all candidates)")
    p.add_argument("--rank-by", choices=RANK_BY, default=None,
                   help="clip: CLIP similarity; perplexity: the generator's own perplexity, lower first (the "
                        "original ruDALL-E's order; needs no CLIP); combined: both, z-scored within each prompt's "
                        "candidates (default: clip when the pipeline has a CLIP, else perplexity)")
    p.add_argument("--rank-weight", type=float, default=None, metavar="W",
                   help="with --rank-by combined: CLIP's share in [0, 1] of the combined score (1 = CLIP order, "
                        "0 = perplexity order; default: 0.5)")
    p.add_argument("--upscale", choices=UPSCALE_CHOICES, default=None,
                   help="Real-ESRGAN factor for the kept images (default: the pipeline's upscaler, x4 for Hub "
                        "models; none if it has none)")
    p.add_argument("--out", default="rudalle_out", metavar="DIR", help="output directory (default: ./rudalle_out)")
    p.add_argument("--device", default=None, metavar="D",
                   help="cpu, cuda, cuda:N or mps, as available here (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES + ("int8",), default="float32",
                   help="generator precision (default: float32); int8: weight-only int8 blocks and head with fp32 "
                        "elsewhere, a quarter of the bytes a decoding step reads; on a CPU, bfloat16 and int8 "
                        "both decode Malevich about twice as fast as float32 (benchmarks/scale.py)")
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
