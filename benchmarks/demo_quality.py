"""Quality and speed of a demo-family pipeline, judged by the shapes detector.

Rerun with::

    python benchmarks/demo_quality.py                     # the bundled "demo" pipeline
    python benchmarks/demo_quality.py --model DIR         # any directory written by save_pipeline
    python benchmarks/demo_quality.py --prompts 96        # more prompts per split (default 48)
    python benchmarks/demo_quality.py --seeds 0 1 2       # the README's table: generation rows over 3 seeds
    python benchmarks/demo_quality.py --quick             # few prompts and images, for a smoke run

Everything is measured in this one run, with fixed seeds (``--seed``), and printed as one table,
each value next to its goal:

1. detector: accuracy of ``shapes.detect`` on ground-truth 64 px renders (split "all"), all five
   attributes right and per attribute;
2. generation, separately for seen (split "train") and held-out (split "heldout") prompts, at every
   classifier-free guidance scale of ``--guidance-scales`` (1 = unguided) and averaged over
   ``--seeds``: for each prompt ``--candidates`` images are generated; the number of distinct
   candidates (different code grids), candidate 0 ("one random image"), and the top-1 by CLIP, by
   the generator's own perplexity (the original's ranking) and by the combined score
   (``rerank(by="combined")``) are scored by the detector, all five attributes right. The goals are
   then printed unguided and at the best scale (best held-out random-candidate accuracy);
3. VQGAN: reconstruction PSNR (encode -> decode) of held-out 64 px renders, varied and plain;
4. x4 super-resolution: PSNR against the 256 px render, for the upscaler and for PIL bicubic, both
   from the 64 px render of held-out scenes;
5. speed: wall time of the chain for one prompt (model loading excluded): generate ``--candidates``
   images (unguided, and with the best guidance scale), rerank with CLIP, upscale the best 4 x4; the
   median over 3 prompts;
6. image prompts (seen prompts): inpainting (the object's patches masked out, the same caption, CLIP
   top-1 of ``--candidates`` scored by the detector), paste-back (largest difference of a kept pixel
   from the input after ``paste_back``), outpainting (``right=2`` on scenes with the object on the
   left: kept codes unchanged, and the new strip's mean colour within 8 levels of the background).
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from rudalle_pipe import ImagePrompt, outpaint, paste_back, rerank, shapes
from rudalle_pipe.clip import cherry_pick_by_clip
from rudalle_pipe.generation import generate_images
from rudalle_pipe.pipeline import Pipeline, load_pipeline
from rudalle_pipe.realesrgan import super_resolution

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "color", "size", "position", "background")


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two same-size RGB uint8 images (peak 255)."""
    x = np.asarray(a.convert("RGB"), np.float64)
    y = np.asarray(b.convert("RGB"), np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def examples(split: str, count: int, seed: int, sizes: Sequence[int] = (64,), varied: bool = True) -> list[dict]:
    """``count`` deterministic examples of ``split`` (make_example with seeds seed*100000 + i); varied
    renders (each a random variation of its scene) unless ``varied=False``."""
    return [shapes.make_example(seed * 100_000 + i, split, sizes, varied=varied) for i in range(count)]


def detector_accuracy(count: int, seed: int) -> dict[str, float]:
    """Detector accuracy on ground-truth 64 px renders of split "all"."""
    exs = examples("all", count, seed + 1)
    return shapes.score([e[64] for e in exs], [e["scene"] for e in exs])


def _top1(values: Sequence[float], lowest: bool = False) -> int:
    """Index of the best value (the first one among ties)."""
    return min(range(len(values)), key=lambda i: values[i] if lowest else -values[i])


def generation_accuracy(pipe: Pipeline, split: str, prompts: int, candidates: int, seed: int,
                        sampling: dict, guidance_scale: float = 1.0) -> dict:
    """For ``prompts`` prompts of ``split``, ``candidates`` images each (guided by ``guidance_scale``):
    detector scores of candidate 0 ("random") and of the top-1 by CLIP, by the model's own perplexity
    and by the combined score ("clip", "perplexity", "combined"), and the mean number of distinct
    candidates (different code grids) per prompt ("distinct")."""
    exs = examples(split, prompts, seed + (2 if split == "train" else 3))
    picks: dict[str, list] = {"random": [], "clip": [], "perplexity": [], "combined": []}
    scenes, distinct = [], []
    for i, ex in enumerate(exs):
        out = generate_images(ex["caption"], pipe.tokenizer, pipe.dalle, pipe.vae, num_images=candidates,
                              seed=seed * 1000 + i * candidates, progress=False, guidance_scale=guidance_scale,
                              **sampling)
        scenes.append(ex["scene"])
        distinct.append(len({tuple(c.tolist()) for c in out.codes}))
        picks["random"].append(out.images[0])
        picks["perplexity"].append(out.images[_top1(out.perplexities, lowest=True)])
        if pipe.clip is not None:
            ranked = rerank(out.images, ex["caption"], clip=pipe.clip, perplexities=out.perplexities,
                            by="combined", progress=False)
            by_input = {name: [0.0] * candidates for name in ("clip", "combined")}
            for j, index in enumerate(ranked.indices):
                by_input["clip"][index] = ranked.clip_scores[j]
                by_input["combined"][index] = ranked.combined[j]
            picks["clip"].append(out.images[_top1(by_input["clip"])])
            picks["combined"].append(out.images[ranked.indices[0]])
        logger.info("%s prompt %d/%d done: %r", split, i + 1, len(exs), ex["caption"])
    result = {name: shapes.score(images, scenes) for name, images in picks.items() if images}
    result["distinct"] = float(np.mean(distinct))
    return result


def vqgan_psnr(pipe: Pipeline, count: int, seed: int, varied: bool = True) -> float:
    """Mean reconstruction PSNR (dB) of held-out 64 px renders through encode -> decode."""
    exs = examples("heldout", count, seed + 4, varied=varied)
    pixels = torch.stack([torch.from_numpy(np.array(e[64])).permute(2, 0, 1) for e in exs]).float() / 255  # (N, 3, 64, 64)
    values = []
    with torch.inference_mode():
        for first in range(0, count, 16):
            codes = pipe.vae.get_codebook_indices(pixels[first:first + 16])  # (b, h*w)
            recon = pipe.vae.decode(codes)  # (b, 3, 64, 64) in [0, 1]
            arrays = (recon * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            values += [psnr(Image.fromarray(a), e[64]) for a, e in zip(arrays, exs[first:first + 16])]
    return float(np.mean(values))


def sr_psnr(pipe: Pipeline, count: int, seed: int) -> tuple[float, float]:
    """Mean PSNR (dB) vs the 256 px render of (upscaler x4, PIL bicubic x4) from the 64 px render."""
    exs = examples("heldout", count, seed + 5, sizes=(64, 256))
    ups = super_resolution([e[64] for e in exs], pipe.upscaler, progress=False)
    model = [psnr(u, e[256]) for u, e in zip(ups, exs)]
    bicubic = [psnr(e[64].resize((256, 256), Image.BICUBIC), e[256]) for e in exs]
    return float(np.mean(model)), float(np.mean(bicubic))


def chain_seconds(pipe: Pipeline, candidates: int, seed: int, sampling: dict, repeats: int = 3,
                  guidance_scale: float = 1.0) -> float:
    """Median wall time of generate ``candidates`` + CLIP rerank + x4 of the best 4, per prompt."""
    times = []
    for i, ex in enumerate(examples("heldout", repeats, seed + 6)):
        start = time.perf_counter()
        out = generate_images(ex["caption"], pipe.tokenizer, pipe.dalle, pipe.vae, num_images=candidates,
                              seed=seed * 1000 + i, progress=False, guidance_scale=guidance_scale, **sampling)
        best = out.images[:4]
        if pipe.clip is not None:
            best = cherry_pick_by_clip(out.images, ex["caption"], pipe.clip, top_n=min(4, candidates),
                                       progress=False).images
        if pipe.upscaler is not None:
            super_resolution(best, pipe.upscaler, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_prompt_rates(pipe: Pipeline, prompts: int, candidates: int, seed: int,
                       sampling: dict) -> dict[str, float]:
    """Inpainting accuracy, paste-back's largest kept-pixel difference, and outpainting checks (see 6.)."""
    exs = examples("train", prompts, seed + 7)
    tops, scenes, worst_paste = [], [], 0
    for i, ex in enumerate(exs):
        image, scene = ex[64], ex["scene"]
        pixels = np.asarray(image, np.int16)
        background = np.array(shapes.BACKGROUNDS[scene.background], np.int16)
        keep = np.abs(pixels - background).max(axis=-1) <= 24  # background pixels; the object's patches go
        prompt = ImagePrompt.from_mask(image, pipe.vae, keep)
        out = generate_images(ex["caption"], pipe.tokenizer, pipe.dalle, pipe.vae, num_images=candidates,
                              seed=seed * 1000 + i * candidates, progress=False, image_prompt=prompt, **sampling)
        pasted = paste_back(out.images, image, keep, feather=2)
        worst_paste = max(worst_paste, max(int(np.abs(np.asarray(p, np.int16) - pixels)[keep].max()) for p in pasted))
        if pipe.clip is not None:
            tops.append(cherry_pick_by_clip(pasted, ex["caption"], pipe.clip, top_n=1, progress=False).images[0])
        else:
            tops.append(pasted[0])
        scenes.append(scene)
    left = [e for e in examples("train", prompts * 8, seed + 8) if e["scene"].position == "слева"][:prompts]
    kept_ok, strip_ok = [], []
    for i, ex in enumerate(left):
        result = outpaint(ex[64], ex["caption"], pipe.tokenizer, pipe.dalle, pipe.vae, right=2, seed=seed + i,
                          **sampling)
        side = math.isqrt(result.codes.shape[-1])  # codes per side
        old = result.input_codes.view(side, side)[:, 2:]
        new = result.codes[0, 0].view(side, side)
        kept_ok.append(bool((new[:, :side - 2] == old).all()))
        strip = np.asarray(result.stitched[0], np.float64)[:, -2 * ex[64].width // side:]
        background = np.array(shapes.BACKGROUNDS[ex["scene"].background], np.float64)
        strip_ok.append(bool(np.abs(strip.reshape(-1, 3).mean(0) - background).max() <= 8))
    return {"inpaint": shapes.score(tops, scenes)["all"], "paste": float(worst_paste),
            "outpaint_kept": float(np.mean(kept_ok)), "outpaint_strip": float(np.mean(strip_ok)), "left": len(left)}


RANKINGS = ("clip", "perplexity", "combined")


def generation_table(pipe: Pipeline, prompts: int, args: argparse.Namespace, sampling: dict) -> float:
    """Generate for both splits at every ``--guidance-scales`` value and every ``--seeds`` seed; print
    one column per scale (means over the seeds), then the goals unguided and at the best scale (the
    one with the best held-out random-candidate accuracy). Returns that scale."""
    scales, seeds = args.guidance_scales, args.seeds
    runs = {(split, scale): [generation_accuracy(pipe, split, prompts, args.candidates, seed, sampling, scale)
                             for seed in seeds]
            for split in ("train", "heldout") for scale in scales}

    def mean(split: str, scale: float, key: str) -> float:
        values = [r[key] if key == "distinct" else r[key]["all"] for r in runs[split, scale] if key in r]
        return float(np.mean(values)) if values else float("nan")

    print(f"\ngeneration, {prompts} prompts/split x {args.candidates} candidates, mean over seeds {seeds}; "
          "'all attributes right' unless named")
    print(f"{'guidance scale':<40}" + "".join(f"{s:>12g}" for s in scales))
    for split, label in (("train", "seen"), ("heldout", "held-out")):
        print(f"{label + ': distinct candidates of ' + str(args.candidates):<40}"
              + "".join(f"{mean(split, s, 'distinct'):>12.1f}" for s in scales))
        for key in ("random", *RANKINGS):
            name = "one random candidate" if key == "random" else f"top-1 by {key}"
            print(f"{label + ': ' + name:<40}" + "".join(f"{mean(split, s, key):>12.1%}" for s in scales))
        if len(seeds) > 1:
            for key in ("random", "clip"):
                per_seed = ["/".join(f"{r[key]['all'] * 100:.0f}" for r in runs[split, s] if key in r) for s in scales]
                print(f"{'  ' + label + ' ' + key + ' % per seed':<40}" + "".join(f"{v:>12}" for v in per_seed))
    guided = [s for s in scales if s != 1] or scales
    best = max(guided, key=lambda s: (mean("heldout", s, "random"), -s))
    print()
    print(row("measure (unguided -> guidance %g)" % best, "value", "goal"))
    print("-" * 88)
    goals = [("train", "distinct", "seen: distinct candidates of %d" % args.candidates, 12.0, "count"),
             ("train", "random", "seen: one random candidate", 0.70, "rate"),
             ("train", "clip", "seen: CLIP top-1 of %d" % args.candidates, 0.95, "rate"),
             ("heldout", "random", "held-out: one random candidate", 0.85, "rate"),
             ("heldout", "clip", "held-out: CLIP top-1 of %d" % args.candidates, 0.90, "rate")]
    for split, key, name, goal, kind in goals:
        before, after = mean(split, 1.0, key) if 1.0 in scales else float("nan"), mean(split, best, key)
        fmt = (lambda v: f"{v:.1f}") if kind == "count" else (lambda v: f"{v:.1%}")
        print(row(name, f"{fmt(before)} -> {fmt(after)}", f">= {fmt(goal)}", after >= goal))
    return best


def row(name: str, value: str, goal: str = "", ok: bool | None = None) -> str:
    mark = "" if ok is None else ("ok" if ok else "MISS")
    return f"{name:<46} {value:>10}   {goal:<22} {mark}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="pipeline name or directory (default: demo)")
    parser.add_argument("--prompts", type=int, default=48, help="prompts per split (default 48)")
    parser.add_argument("--candidates", type=int, default=16, help="images per prompt (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--top-k", type=int, default=None, help="default: min(2048, image vocabulary)")
    parser.add_argument("--top-p", type=float, default=0.99)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                        help="base seeds of the generation rows, averaged (default: 0; the README uses 0 1 2)")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0], metavar="G",
                        help="classifier-free guidance scales to scan (default: 1 2 3 5; 1 = unguided)")
    parser.add_argument("--quick", action="store_true", help="few prompts and images, for a smoke run")
    args = parser.parse_args()
    for name in ("prompts", "candidates"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING)
    n_detect, n_vq, n_sr = (60, 16, 8) if args.quick else (300, 64, 32)
    prompts = min(args.prompts, 4) if args.quick else args.prompts

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    vocab = pipe.dalle.config.image_vocab_size
    sampling = {"top_k": args.top_k or min(2048, vocab), "top_p": args.top_p, "temperature": args.temperature}
    print(f"pipeline {pipe.name!r}: image vocab {vocab}, {prompts} prompts/split, {args.candidates} candidates, "
          f"top_k={sampling['top_k']} top_p={args.top_p} temperature={args.temperature} seed={args.seed}"
          + (" [quick]" if args.quick else ""))
    print(row("measure", "value", "goal"))
    print("-" * 88)

    det = detector_accuracy(n_detect, args.seed)
    print(row(f"detector on renders ({n_detect}), all attributes", f"{det['all']:.1%}", ">= 99%", det["all"] >= 0.99))
    for a in ATTRIBUTES:
        print(row(f"  detector {a}", f"{det[a]:.1%}", ">= 99%", det[a] >= 0.99))

    best = generation_table(pipe, prompts, args, sampling)

    vq = vqgan_psnr(pipe, n_vq, args.seed)
    print(row(f"VQGAN reconstruction PSNR, held-out varied ({n_vq})", f"{vq:.2f} dB", ">= 30 dB", vq >= 30))
    vq = vqgan_psnr(pipe, n_vq, args.seed, varied=False)
    print(row(f"VQGAN reconstruction PSNR, held-out plain ({n_vq})", f"{vq:.2f} dB", "(reference)"))

    if pipe.upscaler is not None:
        model, bicubic = sr_psnr(pipe, n_sr, args.seed)
        print(row(f"x4 SR PSNR vs 256 px, upscaler ({n_sr})", f"{model:.2f} dB", f">= {bicubic + 3:.2f} dB",
                  model >= bicubic + 3))
        print(row(f"x4 SR PSNR vs 256 px, bicubic ({n_sr})", f"{bicubic:.2f} dB", "(reference)"))
    else:
        print(row("x4 SR PSNR", "n/a", "(no upscaler in pipeline)"))

    ip = image_prompt_rates(pipe, prompts, args.candidates, args.seed, sampling)
    top = "CLIP top-1" if pipe.clip is not None else "candidate 0"
    print(row(f"inpaint ({prompts}): {top} of {args.candidates}, all", f"{ip['inpaint']:.1%}", ">= 90%",
              ip["inpaint"] >= 0.9))
    print(row("paste-back: largest kept-pixel difference", f"{ip['paste']:.0f}", "= 0", ip["paste"] == 0))
    print(row(f"outpaint right=2 ({ip['left']}): kept codes unchanged", f"{ip['outpaint_kept']:.1%}", "= 100%",
              ip["outpaint_kept"] == 1))
    print(row(f"outpaint right=2 ({ip['left']}): new strip is background", f"{ip['outpaint_strip']:.1%}", ">= 90%",
              ip["outpaint_strip"] >= 0.9))

    for scale in sorted({1.0, best}):
        seconds = chain_seconds(pipe, args.candidates, args.seed, sampling, guidance_scale=scale)
        print(row(f"chain, guidance {scale:g}: {args.candidates} cand + rerank + x4 best 4", f"{seconds:.2f} s",
                  "< 10 s", seconds < 10))


if __name__ == "__main__":
    main()
