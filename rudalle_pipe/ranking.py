"""Ranking generated candidates: by CLIP score, by the generator's own perplexity, or by both.

* ``by="clip"``: cosine similarity between each image and the text under a CLIP model (higher is
  better), as :func:`rudalle_pipe.cherry_pick_by_clip` always did.
* ``by="perplexity"``: the original ruDALL-E's ranking: ascending perplexity (lower is better; the
  mean over tokens of ``exp(cross-entropy)``, as :class:`rudalle_pipe.GenerationOutput` reports it).
  Needs no CLIP model.
* ``by="combined"``: ``weight * z(clip score) + (1 - weight) * z(-log perplexity)`` (higher is
  better), where ``z`` is the z-score within the candidate set, see :func:`combine_scores`.

Every sort is stable: candidates with equal scores keep their input order.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .checks import check_count, check_float
from .images import check_images

if TYPE_CHECKING:  # clip.py imports this module; ClipBundle is imported lazily at run time
    from .clip import ClipBundle

logger = logging.getLogger(__name__)

__all__ = ["RANK_BY", "DEFAULT_WEIGHT", "RerankOutput", "rerank", "cherry_pick_by_clip", "clip_scores",
           "combine_scores", "check_perplexities"]

RANK_BY = ("clip", "perplexity", "combined")  # the valid values of ``by``
DEFAULT_WEIGHT = 0.5  # CLIP's share in the combined score when ``weight`` is not given


@dataclass
class RerankOutput:
    """Images sorted best first, with every score that was computed, all in the same (ranked) order.

    ``scores`` is the score the images were ranked by (``by``): the CLIP cosine similarity in
    ``[-1, 1]`` (descending), the perplexity (> 0, ascending: lower is better) or the combined score
    (descending). ``clip_scores``, ``perplexities`` and ``combined`` are None where not computed (no
    ``clip``, no ``perplexities``, or not both for ``combined``).
    """

    images: list[Image.Image]  # the input images, best first
    scores: list[float]  # the ranking score of each image, same order
    indices: list[int]  # position of each image in the input list
    by: str = "clip"  # what ``scores`` is: "clip", "perplexity" or "combined"
    clip_scores: Optional[list[float]] = None  # cosine similarity to the text, in [-1, 1]
    perplexities: Optional[list[float]] = None  # as given, > 0
    combined: Optional[list[float]] = None  # see combine_scores
    weight: Optional[float] = None  # CLIP's share in ``combined``; None when it was not computed


# ------------------------------------------------------------------------------------------ checks


def check_perplexities(perplexities: object, count: int) -> list[float]:
    """``perplexities`` as a list of floats, or a TypeError/ValueError: it must be a sequence (or a 1-D
    tensor/array) of ``count`` finite real numbers > 0, one per image."""
    if isinstance(perplexities, (str, bytes)) or not hasattr(perplexities, "__len__"):
        raise TypeError(f"perplexities must be a list of {count} numbers > 0 (one per image), got "
                        f"{type(perplexities).__name__}")
    if hasattr(perplexities, "tolist"):  # a torch tensor or numpy array
        if getattr(perplexities, "ndim", 1) != 1:
            raise ValueError(f"perplexities must be 1-D (one per image), got shape {tuple(perplexities.shape)}")
        perplexities = perplexities.tolist()
    if len(perplexities) != count:
        raise ValueError(f"perplexities has {len(perplexities)} values but there are {count} images; "
                         "give one per image, in the same order")
    return [check_float(f"perplexities[{i}]", p, low=0, low_open=True) for i, p in enumerate(perplexities)]


def _check_clip_args(clip: object, top_n: object, count: int, batch_size: object, templates: object) -> None:
    """TypeError/ValueError naming the bad argument among the CLIP-related and common ones."""
    if clip is not None:
        from .clip import ClipBundle

        if not isinstance(clip, ClipBundle):
            raise TypeError(f"clip must be a ClipBundle from get_clip() (or None), got {type(clip).__name__}")
    if top_n is not None:  # None keeps every image
        check_count("top_n", top_n)
        if top_n > count:
            raise ValueError(f"top_n={top_n} is larger than the number of images ({count})")
    check_count("batch_size", batch_size)
    if templates is not None:
        if isinstance(templates, str) or not isinstance(templates, Sequence):
            raise TypeError(f"templates must be a list of str, got {type(templates).__name__}")
        if len(templates) == 0:
            raise ValueError("templates is empty; pass None to use the text as it is")
        for i, template in enumerate(templates):
            if not isinstance(template, str) or "{}" not in template:
                raise ValueError(f"templates[{i}] = {template!r} must be a str containing '{{}}'")
        if clip is None:
            raise ValueError("templates only shape the CLIP text embedding, and clip is None; pass clip= or "
                             "drop templates")


def _check_by(by: object, clip: object, perplexities: object) -> None:
    if not isinstance(by, str) or by not in RANK_BY:
        raise ValueError(f"by must be one of {', '.join(map(repr, RANK_BY))}, got {by!r}")
    if by in ("clip", "combined") and clip is None:
        raise ValueError(f"by={by!r} needs clip= (a ClipBundle from get_clip()); without a CLIP model rank "
                         "with by='perplexity' and perplexities=")
    if by in ("perplexity", "combined") and perplexities is None:
        raise ValueError(f"by={by!r} needs perplexities= (one per image, e.g. GenerationOutput.perplexities)")


# ------------------------------------------------------------------------------------------ scores


def _text_embedding(text: str, clip: "ClipBundle", templates: Optional[Sequence[str]]) -> torch.Tensor:
    """Unit-norm text embedding, float32 (D,): the renormalized mean over the filled templates."""
    device = next(clip.model.parameters()).device
    prompts = [t.replace("{}", text) for t in templates] if templates else [text]
    tokens = clip.tokenizer(prompts).to(device)  # (T, context_length) int64
    emb = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)  # (T, D)
    return F.normalize(emb.mean(dim=0), dim=-1)  # (D,)


def _image_embeddings(images: Sequence[Image.Image], clip: "ClipBundle", batch_size: int,
                      progress: bool) -> torch.Tensor:
    """Unit-norm image embeddings, float32 (N, D), computed ``batch_size`` images at a time."""
    param = next(clip.model.parameters())
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="CLIP", disable=not progress, leave=False):
        batch = [clip.preprocess(image) for image in images[start:start + batch_size]]  # each (3, S, S)
        pixels = torch.stack(batch).to(device=param.device, dtype=param.dtype)  # (B, 3, S, S)
        chunks.append(F.normalize(clip.model.encode_image(pixels).float(), dim=-1))  # (B, D)
    return torch.cat(chunks)  # (N, D)


def clip_scores(images: Sequence[Image.Image], text: str, clip: "ClipBundle", *, batch_size: int = 16,
                templates: Optional[Sequence[str]] = None, progress: bool = True) -> list[float]:
    """Cosine similarity in ``[-1, 1]`` of each image to ``text`` under ``clip``, in input order.

    The arguments are those of :func:`rerank` and are assumed checked (use :func:`rerank`)."""
    with torch.inference_mode():
        text_emb = _text_embedding(text, clip, templates)  # (D,)
        image_emb = _image_embeddings(list(images), clip, batch_size, progress)  # (N, D)
        scores = (image_emb @ text_emb).cpu()  # (N,) cosine similarities
    if not torch.isfinite(scores).all():
        raise RuntimeError(f"CLIP produced non-finite scores {scores.tolist()}; check the model weights/dtype")
    return scores.tolist()


def _zscore(values: Sequence[float]) -> list[float]:
    """``(x - mean) / std`` with the population std; all zeros when every value is equal (tested
    directly: the rounded mean of equal values can differ from them, giving a tiny non-zero std)."""
    if max(values) == min(values):
        return [0.0] * len(values)
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def combine_scores(clip: Sequence[float], perplexities: Sequence[float], weight: float = DEFAULT_WEIGHT
                   ) -> list[float]:
    """The combined score of each candidate (higher is better), in input order.

    ``combined_i = weight * z(clip)_i + (1 - weight) * z(-log perplexity)_i``, where ``z`` is the
    z-score within the candidate set: ``z(x)_i = (x_i - mean(x)) / std(x)`` with the population
    standard deviation; when every value of ``x`` is equal (or there is one candidate) ``z(x)`` is all
    zeros, so that signal then does not reorder anything. ``weight`` in ``[0, 1]`` is CLIP's share:
    1 ranks exactly as CLIP does, 0 exactly as the perplexity does. Computed in float64.
    """
    weight = check_float("weight", weight, low=0, high=1)
    if len(clip) != len(perplexities) or not clip:
        raise ValueError(f"clip and perplexities must have the same, non-zero length, got {len(clip)} and "
                         f"{len(perplexities)}")
    z_clip = _zscore([float(c) for c in clip])
    z_ppl = _zscore([-math.log(p) for p in perplexities])
    return [weight * c + (1 - weight) * p for c, p in zip(z_clip, z_ppl)]


# ------------------------------------------------------------------------------------------ rerank


def rerank(
    images: Sequence[Image.Image],
    text: str,
    *,
    clip: Optional["ClipBundle"] = None,
    perplexities: Optional[Sequence[float]] = None,
    by: str = "clip",
    weight: Optional[float] = None,
    top_n: Optional[int] = None,
    batch_size: int = 16,
    templates: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> RerankOutput:
    """Rank ``images`` for ``text``, best first, by CLIP score, perplexity or both.

    Every score whose inputs are given is computed and returned: CLIP scores when ``clip`` is given,
    the perplexities when given, the combined score when both are; ``by`` picks the one that orders.

    Args:
        images: candidate PIL images (any size/mode; ``clip.preprocess`` resizes and converts).
        text: the prompt, used as is for CLIP (no lowercasing); Russian works with the default model.
        clip: a bundle from :func:`rudalle_pipe.get_clip`; needed for ``by="clip"`` and ``"combined"``.
        perplexities: one float > 0 per image, in the same order (``GenerationOutput.perplexities``);
            needed for ``by="perplexity"`` and ``"combined"``.
        by: ``"clip"`` (cosine similarity, descending), ``"perplexity"`` (ascending, as the original
            ruDALL-E ranked), or ``"combined"`` (see :func:`combine_scores`, descending).
        weight: CLIP's share in ``[0, 1]`` of the combined score (default 0.5); only when both ``clip``
            and ``perplexities`` are given (otherwise there is no combined score for it to change).
        top_n: keep the best ``top_n`` (1 <= top_n <= len(images)), or None for all; never clipped.
        batch_size: images per CLIP forward pass.
        templates: optional CLIP prompt templates such as ``"изображение {}"``; every ``{}`` is
            replaced by ``text`` and the text embedding is the renormalized mean of the normalized
            template embeddings (as ruCLIP did). Needs ``clip``.
        progress: show a tqdm bar over the CLIP image batches.

    Returns:
        :class:`RerankOutput`; ties keep their input order (stable sort).

    Raises:
        TypeError, ValueError: before any work, naming the bad argument (unknown ``by``, a ``clip`` or
            ``perplexities`` that ``by`` needs but is missing, perplexities of the wrong length or not
            finite and > 0, a ``weight`` outside [0, 1] or without a combined score, ...).
    """
    check_images(images)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
    _check_clip_args(clip, top_n, len(images), batch_size, templates)
    _check_by(by, clip, perplexities)
    ppl = None if perplexities is None else check_perplexities(perplexities, len(images))
    if weight is not None:
        check_float("weight", weight, low=0, high=1)
        if clip is None or ppl is None:
            raise ValueError(f"weight={weight} sets CLIP's share of the combined score, which needs both clip= and "
                             "perplexities=; drop weight or pass both (with by='combined' to rank by it)")
    images = list(images)

    clip_values = None if clip is None else clip_scores(images, text, clip, batch_size=batch_size,
                                                       templates=templates, progress=progress)
    combined = None
    if clip_values is not None and ppl is not None:
        weight = DEFAULT_WEIGHT if weight is None else float(weight)
        combined = combine_scores(clip_values, ppl, weight)
    key = {"clip": clip_values, "perplexity": ppl, "combined": combined}[by]
    sign = 1 if by == "perplexity" else -1  # perplexity: lower is better
    order = sorted(range(len(images)), key=lambda i: sign * key[i])[:top_n]  # stable: ties keep input order
    logger.info("ranked %d candidates for %r by %s: best %.4f, worst %.4f", len(images), text, by,
                key[order[0]], key[order[-1]])

    def pick(values: Optional[list[float]]) -> Optional[list[float]]:
        return None if values is None else [values[i] for i in order]

    return RerankOutput(images=[images[i] for i in order], scores=pick(key), indices=order, by=by,
                        clip_scores=pick(clip_values), perplexities=pick(ppl), combined=pick(combined),
                        weight=weight if combined is not None else None)


def cherry_pick_by_clip(
    images: Sequence[Image.Image],
    text: str,
    clip: Optional["ClipBundle"] = None,
    *,
    top_n: Optional[int] = None,
    batch_size: int = 16,
    templates: Optional[Sequence[str]] = None,
    progress: bool = True,
    by: str = "clip",
    perplexities: Optional[Sequence[float]] = None,
    weight: Optional[float] = None,
) -> RerankOutput:
    """Rank ``images`` by CLIP cosine similarity to ``text``, best first; :func:`rerank` with ``clip``
    positional (the original's signature). ``by``, ``perplexities`` and ``weight`` are as in
    :func:`rerank`: ``by="perplexity"`` needs no ``clip``.

    Returns:
        :class:`RerankOutput`; ties keep their input order (stable sort).
    """
    return rerank(images, text, clip=clip, perplexities=perplexities, by=by, weight=weight, top_n=top_n,
                  batch_size=batch_size, templates=templates, progress=progress)
