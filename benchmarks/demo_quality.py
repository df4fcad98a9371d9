"""Quality and speed of a demo-family pipeline, judged by the shapes detector.

Rerun with::

    python benchmarks/demo_quality.py                     # the bundled "demo" pipeline
    python benchmarks/demo_quality.py --model DIR         # any directory written by save_pipeline
    python benchmarks/demo_quality.py --prompts 96        # more prompts per split (default 48)
    python benchmarks/demo_quality.py --quick             # few prompts and images, for a smoke run

Everything is measured in this one run, with fixed seeds (``--seed``), and printed as one table,
each value next to its goal:

1. detector: accuracy of ``shapes.detect`` on ground-truth 64 px renders (split "all"), all five
   attributes right and per attribute;
2. generation, separately for seen (split "train") and held-out (split "heldout") prompts: for each
   prompt ``--candidates`` images are generated; candidate 0 stands for "one random image" (all
   attributes and per attribute), and CLIP's top-1 of all candidates is scored too;
3. VQGAN: reconstruction PSNR (encode -> decode) of held-out 64 px renders;
4. x4 super-resolution: PSNR against the 256 px render, for the upscaler and for PIL bicubic, both
   from the 64 px render of held-out scenes;
5. speed: wall time of the chain for one prompt (model loading excluded): generate ``--candidates``
   images, rerank with CLIP, upscale the best 4 x4; the median over 3 prompts;
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

from rudalle_pipe import ImagePrompt, outpaint, paste_back, shapes
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


def examples(split: str, count: int, seed: int, sizes: Sequence[int] = (64,)) -> list[dict]:
    """``count`` deterministic examples of ``split`` (make_example with seeds seed*100000 + i)."""
    return [shapes.make_example(seed * 100_000 + i, split, sizes) for i in range(count)]


def detector_accuracy(count: int, seed: int) -> dict[str, float]:
    """Detector accuracy on ground-truth 64 px renders of split "all"."""
    exs = examples("all", count, seed + 1)
    return shapes.score([e[64] for e in exs], [e["scene"] for e in exs])


def generation_accuracy(pipe: Pipeline, split: str, prompts: int, candidates: int, seed: int,
                        sampling: dict) -> dict[str, dict[str, float]]:
    """Detector scores of candidate 0 ("random") and of CLIP's top-1 ("clip") over ``prompts`` prompts."""
    exs = examples(split, prompts, seed + (2 if split == "train" else 3))
    randoms, tops, scenes = [], [], []
    for i, ex in enumerate(exs):
        out = generate_images(ex["caption"], pipe.tokenizer, pipe.dalle, pipe.vae, num_images=candidates,
                              seed=seed * 1000 + i * candidates, progress=False, **sampling)
        randoms.append(out.images[0])
        scenes.append(ex["scene"])
        if pipe.clip is not None:
            tops.append(cherry_pick_by_clip(out.images, ex["caption"], pipe.clip, top_n=1, progress=False).images[0])
        logger.info("%s prompt %d/%d done: %r", split, i + 1, len(exs), ex["caption"])
    result = {"random": shapes.score(randoms, scenes)}
    if tops:
        result["clip"] = shapes.score(tops, scenes)
    return result


def vqgan_psnr(pipe: Pipeline, count: int, seed: int) -> float:
    """Mean reconstruction PSNR (dB) of held-out 64 px renders through encode -> decode."""
    exs = examples("heldout", count, seed + 4)
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


def chain_seconds(pipe: Pipeline, candidates: int, seed: int, sampling: dict, repeats: int = 3) -> float:
    """Median wall time of generate ``candidates`` + CLIP rerank + x4 of the best 4, per prompt."""
    times = []
    for i, ex in enumerate(examples("heldout", repeats, seed + 6)):
        start = time.perf_counter()
        out = generate_images(ex["caption"], pipe.tokenizer, pipe.dalle, pipe.vae, num_images=candidates,
                              seed=seed * 1000 + i, progress=False, **sampling)
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

    goals = {"train": (0.70, 0.95, "seen"), "heldout": (0.50, 0.80, "held-out")}
    for split, (g_random, g_clip, label) in goals.items():
        acc = generation_accuracy(pipe, split, prompts, args.candidates, args.seed, sampling)
        r = acc["random"]
        print(row(f"{label} ({prompts}): random candidate, all", f"{r['all']:.1%}", f">= {g_random:.0%}",
                  r["all"] >= g_random))
        for a in ATTRIBUTES:
            print(row(f"  {label} random {a}", f"{r[a]:.1%}"))
        if "clip" in acc:
            c = acc["clip"]["all"]
            print(row(f"{label} ({prompts}): CLIP top-1 of {args.candidates}, all", f"{c:.1%}", f">= {g_clip:.0%}",
                      c >= g_clip))
        else:
            print(row(f"{label}: CLIP top-1", "n/a", "(no CLIP in pipeline)"))

    vq = vqgan_psnr(pipe, n_vq, args.seed)
    print(row(f"VQGAN reconstruction PSNR, held-out ({n_vq})", f"{vq:.2f} dB", ">= 30 dB", vq >= 30))

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

    seconds = chain_seconds(pipe, args.candidates, args.seed, sampling)
    print(row(f"chain: {args.candidates} cand + rerank + x4 best 4 (median/3)", f"{seconds:.2f} s", "< 10 s",
              seconds < 10))


if __name__ == "__main__":
    main()
