"""What the web UI (:mod:`rudalle_pipe.web`) runs, without Gradio: settings checks, seeds, the cancel
flag, one generation (generate -> paste back -> rank), upscaling, and the downloadable zip.

Everything here is a plain function or a small class, so it is tested without a browser. The chain is
the command line's: ranking is :func:`rudalle_pipe.cli_generate._rank`, contact-sheet labels are its
``_sheet_label``, and the zip's files are written by :func:`rudalle_pipe.outputs.write_run` (the same
names, PNGs, contact sheet and ``results.json`` layout as ``rudalle-pipe generate``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .checks import check_int

logger = logging.getLogger(__name__)

__all__ = ["WebSettings", "GenerationResult", "CancelFlag", "ZipCache", "PRESETS", "MAX_WEB_IMAGES", "MAX_UPLOAD_SIDE",
           "PROMPT_MODES", "as_int", "caption", "check_settings", "check_upload", "make_callback", "make_prompt_spec",
           "preset_pairs", "resolve_seed", "results_record", "run_generation", "upscale_image", "upscaled_name",
           "write_zip"]

# The original ruDALL-E's recommended (top_k, top_p) pairs, best known first (README, generate_images).
PRESETS = ((2048, 0.995), (1536, 0.99), (1024, 0.99))
MAX_WEB_IMAGES = 256  # candidates per run in the page: a gallery of more is not something to look through
MAX_UPLOAD_SIDE = 4096  # px: an uploaded image prompt larger than this on a side is refused
MAX_RANDOM_SEED = 2**31 - 1  # "random" seeds are drawn in [0, this]: short enough to read and type back
LABELS = {"top_k": "top-k", "top_p": "top-p", "temperature": "temperature", "num_images": "candidates",
          "batch_size": "batch size", "seed": "seed"}  # API argument -> its label in the page


@dataclass
class WebSettings:
    """One run as the page asks for it (field names are the API's)."""

    prompt: str
    num_images: int = 4  # candidates
    top_k: int = 2048
    top_p: float = 0.995
    temperature: float = 1.0
    guidance_scale: float = 1.0  # 1 = no guidance
    negative_prompt: Optional[str] = None  # only with guidance_scale != 1
    seed: Optional[int] = None  # the first candidate's seed; candidate j gets seed + j
    batch_size: int = 8


@dataclass
class GenerationResult:
    """One finished run: every candidate (generation order) and its scores; ``order`` is the rank order."""

    model: str
    settings: WebSettings
    candidates: list  # PIL images, generation order
    seeds: list[int]
    perplexities: list[Optional[float]]
    scores: dict[str, list[Any]]  # "clip_score" | "combined" | "rank": one per candidate (None where not computed)
    order: list[int]  # candidate indices, best first
    rank_by: str
    image_prompt: Optional[dict] = None  # results.json's image_prompt entry
    upscaled: dict[int, tuple[int, Any]] = field(default_factory=dict)  # rank position -> (factor, upscaled PIL image)
    timings: dict[str, float] = field(default_factory=dict)


def preset_pairs(vocab: int) -> list[tuple[str, int, float]]:
    """``(label, top_k, top_p)`` of :data:`PRESETS` for a generator with ``vocab`` image codes; a top-k
    above ``vocab`` is shown clipped, and the label says so (the bundled demo has 512 codes)."""
    out = []
    for k, p in PRESETS:
        clipped = min(k, vocab)
        note = f" (top-k {k} clipped to this model's {vocab} codes)" if clipped != k else ""
        out.append((f"{k} / {p}{note}", clipped, p))
    return out


def check_settings(settings: WebSettings, *, vocab: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming the page's field, the bad value and the valid range,
    with the package's own validators, before any work (``vocab``: the generator's image codes)."""
    from .generation import check_guidance, check_sampling_args

    if not isinstance(settings.prompt, str) or not settings.prompt.strip():
        raise ValueError("the prompt is empty; type what to draw, e.g. 'большой красный круг в центре на сером фоне'")
    check_int(LABELS["num_images"], settings.num_images, low=1, high=MAX_WEB_IMAGES)
    check_sampling_args(top_k=settings.top_k, top_p=settings.top_p, temperature=settings.temperature, vocab=vocab,
                        num_images=settings.num_images, batch_size=settings.batch_size, seed=settings.seed,
                        names=LABELS)
    check_guidance(settings.guidance_scale, settings.negative_prompt,
                   names={"guidance_scale": "guidance scale", "negative_prompt": "negative prompt"})


def as_int(label: str, value: object) -> int:
    """A whole number typed into a number field (Gradio gives floats) as an int; anything else is an
    error naming ``label`` (``2.5`` is refused, not rounded)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{label} must be a whole number, got {value!r}")


def resolve_seed(seed: object, randomize: bool) -> int:
    """The seed a run uses: a fresh one in ``[0, MAX_RANDOM_SEED]`` when ``randomize``, else ``seed``
    (a whole number >= 0, checked); the page shows it so the run can be repeated."""
    if randomize:
        return secrets.randbelow(MAX_RANDOM_SEED + 1)
    if seed is None:
        raise ValueError("seed is empty; type a whole number >= 0 or tick 'random seed'")
    return check_int(LABELS["seed"], as_int(LABELS["seed"], seed), low=0)


class CancelFlag:
    """Set by the Stop button, read by the generation callback at every step (thread-safe)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


def make_callback(cancel: CancelFlag, on_step: Callable[[int, int, int, Any], None]) -> Callable:
    """A ``generate_images`` callback: returns ``False`` (cancel) as soon as ``cancel`` is set, else
    calls ``on_step(batch, step, total_steps, codes)`` (``batch`` counts from 0; a batch's steps restart
    at 1) and goes on."""
    state = {"batch": 0, "last": 0}

    def callback(step: int, total_steps: int, codes) -> bool:
        if cancel.is_set():
            return False
        if step <= state["last"]:
            state["batch"] += 1
        state["last"] = step
        on_step(state["batch"], step, total_steps, codes)
        return not cancel.is_set()

    return callback


def _rank_args(model: str, settings: WebSettings, has_clip: bool) -> argparse.Namespace:
    """The command line's arguments for this run, as ``cli_generate._rank``/``_sheet_label`` read them."""
    return argparse.Namespace(text=[settings.prompt], num_images=settings.num_images, rerank=settings.num_images,
                              rank_by="clip" if has_clip else "perplexity", rank_weight=None,
                              batch_size=settings.batch_size, model=model)


def run_generation(model: str, pipe, settings: WebSettings, *, cancel: CancelFlag,
                   on_step: Callable[[int, int, int, Any], None], prompt_spec=None) -> GenerationResult:
    """Generate ``settings.num_images`` candidates with ``pipe`` and rank them (CLIP when the pipeline
    has one, else perplexity), like ``rudalle-pipe generate`` with the default ranking and no upscaling.

    ``prompt_spec``: a :class:`rudalle_pipe.cli_image_prompt.PromptSpec` (image prompt) or None.
    Raises :class:`rudalle_pipe.GenerationCancelled` when ``cancel`` is set during sampling.
    """
    from .cli_generate import _finite_or_none, _rank
    from .cli_image_prompt import apply_paste_back, build_prompt, prompt_record
    from .generation import generate_images

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    prompt = None if prompt_spec is None else build_prompt(prompt_spec, pipe.vae)
    out = generate_images(settings.prompt, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=settings.top_k,
                          top_p=settings.top_p, num_images=settings.num_images, temperature=settings.temperature,
                          batch_size=settings.batch_size, seed=settings.seed, progress=False, image_prompt=prompt,
                          guidance_scale=settings.guidance_scale, negative_prompt=settings.negative_prompt,
                          callback=make_callback(cancel, on_step), callback_steps=1)
    candidates = out.images if prompt_spec is None else apply_paste_back(out.images, prompt_spec, prompt)
    timings["generate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    perplexities = [_finite_or_none(p, f"the perplexity of candidate {i}") for i, p in enumerate(out.perplexities)]
    args = _rank_args(model, settings, pipe.clip is not None)
    order, scores = _rank(args, pipe, candidates, perplexities, False)
    timings["rerank"] = time.perf_counter() - tick
    return GenerationResult(model=model, settings=settings, candidates=candidates, seeds=list(out.seeds),
                            perplexities=perplexities, scores=scores, order=order, rank_by=args.rank_by,
                            image_prompt=None if prompt_spec is None else prompt_record(prompt_spec, prompt),
                            timings=timings)


def upscale_image(image, upscaler):
    """``image`` (PIL) upscaled by ``upscaler`` (an RRDBNet) with :func:`rudalle_pipe.super_resolution`."""
    from .realesrgan import super_resolution

    return super_resolution([image], upscaler, progress=False)[0]


def caption(result: GenerationResult, position: int) -> str:
    """The gallery caption of the image at rank ``position`` (0 = best): rank, scores and seed."""
    i = result.order[position]
    clip = result.scores["clip_score"][i]
    ppl = result.perplexities[i]
    parts = [f"#{position + 1}"]
    parts.append(f"CLIP {clip:.3f}" if clip is not None else "CLIP n/a")
    parts.append(f"perplexity {ppl:.2f}" if ppl is not None else "perplexity n/a")
    parts.append(f"seed {result.seeds[i]}")
    return " · ".join(parts)


def upscaled_name(position: int, scale: int) -> str:
    """Zip name of the image at rank ``position`` upscaled x``scale``: ``image_000_x4.png``."""
    from .outputs import image_name

    return image_name(position).replace(".png", f"_x{scale}.png")


def results_record(result: GenerationResult) -> dict:
    """``results.json`` of a run from the page: the command line's layout
    (:func:`rudalle_pipe.cli_generate.results_record`) plus ``upscaled``."""
    from .cli_generate import candidate_entries, results_record as record_of_run
    from .outputs import image_name

    s = result.settings
    args = _rank_args(result.model, s, result.rank_by != "perplexity")
    entries = candidate_entries([0] * len(result.candidates), result.seeds, result.perplexities, result.scores)
    settings = {"top_k": s.top_k, "top_p": s.top_p, "temperature": s.temperature, "num_images": s.num_images,
                "seed": s.seed, "batch_size": s.batch_size, "guidance_scale": s.guidance_scale,
                "negative_prompt": s.negative_prompt, "rerank": s.num_images, "rank_by": result.rank_by}
    upscaled = [{"file": upscaled_name(pos, scale), "rank": pos + 1, "scale": scale, "size": list(image.size)}
                for pos, (scale, image) in sorted(result.upscaled.items())]
    kept = [(image_name(pos), i, result.candidates[i]) for pos, i in enumerate(result.order)]
    return record_of_run(args, header={"model": result.model, "source": "rudalle-pipe serve"}, settings=settings,
                         entries=entries, kept=kept, image_prompt=result.image_prompt, timings=result.timings,
                         extra={"upscaled": upscaled})


def write_zip(result: GenerationResult, path: Path) -> Path:
    """Write ``path``: a zip of the run's PNGs (``image_000.png`` best first, upscaled ones as
    ``image_000_x4.png``), ``contact_sheet.png`` and ``results.json``. The files are rendered by
    :func:`rudalle_pipe.outputs.write_run` into a scratch folder first; the zip itself is written under
    a temporary name and renamed into place (:func:`rudalle_pipe.files.atomic_write`)."""
    import io

    from .cli_generate import _sheet_label
    from .contact_sheet import contact_sheet
    from .files import atomic_write
    from .outputs import CONTACT_SHEET, RESULTS, image_name, png_bytes, write_run

    args = _rank_args(result.model, result.settings, result.rank_by != "perplexity")
    args.rank_by = result.rank_by
    record = results_record(result)
    labels = [_sheet_label(args, entry) for entry in record["candidates"]]
    outputs: list[tuple[str, Callable[[], bytes]]] = []
    for pos, i in enumerate(result.order):
        outputs.append((image_name(pos), lambda image=result.candidates[i]: png_bytes(image)))
    for pos, (scale, image) in sorted(result.upscaled.items()):
        outputs.append((upscaled_name(pos, scale), lambda image=image: png_bytes(image)))
    outputs.append((CONTACT_SHEET, lambda: png_bytes(contact_sheet(result.candidates, labels))))
    outputs.append((RESULTS, lambda: (json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False)
                                      + "\n").encode("utf-8")))
    scratch = Path(tempfile.mkdtemp(prefix="rudalle_zip_"))
    try:
        write_run(scratch / "run", outputs, frozenset())
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed
            for name, _ in outputs:
                archive.write(scratch / "run" / name, arcname=name)
        atomic_write(path, buffer.getvalue(), overwrite=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


class ZipCache:
    """A folder this server owns for the zips it offers, bounded to ``max_files`` (oldest removed first),
    made when the first zip is asked for; :meth:`close` removes it. Gradio copies a returned file into its
    own cache, which ``gr.Blocks(delete_cache=...)`` bounds in turn."""

    def __init__(self, max_files: int = 32) -> None:
        check_int("max_files", max_files, low=1)
        self.folder: Optional[Path] = None  # made by the first new_path()
        self.max_files = max_files
        self._lock = threading.Lock()
        self._files: list[Path] = []

    def new_path(self, stem: str = "rudalle") -> Path:
        """A fresh path inside the folder; the oldest files beyond ``max_files - 1`` are removed first."""
        with self._lock:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="rudalle_web_"))
            while len(self._files) >= self.max_files:
                self._files.pop(0).unlink(missing_ok=True)
            path = self.folder / f"{stem}_{secrets.token_hex(8)}.zip"
            self._files.append(path)
            return path

    def discard(self, path: Optional[Path]) -> None:
        """Remove one file of this cache (a session's previous zip)."""
        if path is None:
            return
        with self._lock:
            if path in self._files:
                self._files.remove(path)
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)


def check_upload(image: object, what: str = "the image prompt") -> None:
    """Refuse an upload that is not a decoded picture or is larger than :data:`MAX_UPLOAD_SIDE` a side."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} is not a picture (got {type(image).__name__}); upload a PNG or JPEG")
    if max(image.size) > MAX_UPLOAD_SIDE or min(image.size) < 1:
        raise ValueError(f"{what} is {image.width}x{image.height} px; at most {MAX_UPLOAD_SIDE} px a side")


PROMPT_MODES = ("none", "borders", "painted mask")  # the image-prompt choices of the page


def make_prompt_spec(mode: str, editor: Optional[dict], borders: dict[str, int], *, paste_back: bool,
                     vae_resolution: int, vae_factor: int):
    """The :class:`rudalle_pipe.cli_image_prompt.PromptSpec` of the page's image prompt, or None.

    Args:
        mode: one of :data:`PROMPT_MODES`: ``"borders"`` keeps strips of the uploaded picture (``borders``:
            ``{"up": u, "down": d, "left": l, "right": r}`` in codes); ``"painted mask"`` redraws what
            was painted over it in the image editor (any layer pixel with alpha > 0) and keeps the rest.
        editor: Gradio's ``ImageEditor`` value with ``type="pil"``: ``{"background": PIL, "layers":
            [PIL RGBA, ...], "composite": PIL}``.
        vae_resolution, vae_factor: the model's VQGAN input size and px per code (``_Source`` fields).

    Raises ``ValueError`` naming what is wrong (no picture, a picture too large, borders out of range,
    a mask that keeps nothing or everything), before any encoding.
    """
    import hashlib

    import numpy as np
    import torch
    from PIL import Image

    from .cli_image_prompt import PromptSpec
    from .image_prompts import _check_kept, _parse_borders, keep_pixels

    if mode not in PROMPT_MODES:
        raise ValueError(f"image prompt mode must be one of {', '.join(PROMPT_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    background = (editor or {}).get("background")
    if background is None:
        raise ValueError(f"image prompt '{mode}' needs a picture: upload one in the image prompt editor, or "
                         "choose 'none'")
    check_upload(background)
    image = background.convert("RGB")
    sha = hashlib.sha256(image.tobytes()).hexdigest()  # of the decoded pixels (there is no file)
    side = vae_resolution // vae_factor
    mask = None
    if mode == "borders":
        amounts = _parse_borders(dict(borders), side)
        keep = torch.zeros(side, side, dtype=torch.bool)
        keep[:amounts["up"]] = True
        keep[side - amounts["down"]:] = True
        keep[:, :amounts["left"]] = True
        keep[:, side - amounts["right"]:] = True
        kept, spec_borders = int(keep.sum()), amounts
    else:
        painted = np.zeros((image.height, image.width), dtype=bool)
        for layer in (editor or {}).get("layers") or []:
            if layer is None:
                continue
            if layer.size != image.size:
                raise ValueError(f"a painted layer is {layer.width}x{layer.height} px but the picture is "
                                 f"{image.width}x{image.height}; paint on the uploaded picture itself")
            painted |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if not painted.any():
            raise ValueError("image prompt 'painted mask': nothing is painted; paint over the part to redraw, "
                             "or choose 'borders' or 'none'")
        mask = Image.fromarray(np.where(painted, 0, 255).astype(np.uint8), mode="L")  # white keeps
        pixels = keep_pixels(mask, image.size, vae_resolution)
        kept = int(pixels.reshape(side, vae_factor, side, vae_factor).all(axis=(1, 3)).sum())
        spec_borders = None
    _check_kept(kept, side * side)
    return PromptSpec(file="(uploaded in the page)", sha256=sha, image=image, borders=spec_borders,
                      mask_file=None if mask is None else "(painted in the page)", mask_sha256=None, mask=mask,
                      crop_first=False, paste_back=paste_back, feather=4, kept=kept)
