"""One sampling step's pieces: the logit filters, the per-row draw, the classifier-free guidance mix,
the empty text of the unconditional rows, and the thread setting of CPU decoding.

The loop that strings them together is :func:`rudalle_pipe.generation.sample_codes`; every name here
is re-exported from :mod:`rudalle_pipe.generation` too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from .checks import check_count
from .dalle import DalleModel, uses_numpy_blas

__all__ = ["filter_logits", "filtered_candidates", "guided_logits", "empty_text_ids", "decoding_threads"]

MAX_GUIDANCE = 50.0  # guidance_scale range is (0, MAX_GUIDANCE]


def empty_text_ids(length: int) -> torch.Tensor:
    """The EMPTY TEXT: ``[length]`` LongTensor of zeros, i.e. every text position a pad.

    This is the unconditional input of classifier-free guidance (``generate_images(...,
    guidance_scale=s)`` without ``negative_prompt``) and the caption that caption-dropout training
    must substitute, so that both use one definition. ``DalleModel`` turns id 0 at text position
    ``i`` into that position's pad id; there is no BOS/EOS (unlike ``tokenizer.encode_text("")``).
    """
    check_count("length", length)
    return torch.zeros(length, dtype=torch.long)


def filter_logits(logits: torch.Tensor, *, top_k: int, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in the original's order and semantics.

    Args:
        logits: ``[B, V]`` raw scores.
        top_k: keep the ``top_k`` largest scores (ties with the k-th are kept too).
        top_p: then sort descending and drop every token after the first one whose cumulative
            probability exceeds ``top_p``; the best token always survives.
        temperature: scores are divided by it first.

    Returns:
        ``[B, V]`` float scores with dropped tokens set to ``-inf``.
    """
    logits = logits.float() / temperature
    if top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop_sorted = _nucleus_drop(sorted_logits, top_p)  # (B, V) in sorted order
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def _nucleus_drop(sorted_scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask over descending ``sorted_scores [B, V]``: True after the first token whose
    cumulative probability exceeds ``top_p`` (that token and the best one are always kept)."""
    drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
    drop[..., 0] = False  # always keep the best token
    return drop


def filtered_candidates(
    logits: torch.Tensor, *, top_k: int, top_p: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same filter as :func:`filter_logits`, returned compactly for sampling.

    Only the ``top_k`` best scores are sorted (a full sort happens only when ties with the k-th score
    spill past k), so a step costs O(V + k log k) instead of sorting the whole vocabulary.

    Returns:
        ``scores [B, m]`` sorted descending, dropped entries ``-inf``, and their vocabulary
        indices ``[B, m]``; ``m >= top_k`` only when there are ties.
    """
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    scores, index = None, None
    if top_k < vocab:
        scores, index = logits.topk(top_k, dim=-1)  # (B, k), descending
        if int((logits >= scores[:, -1:]).sum(dim=-1).max()) > top_k:  # ties with the k-th survive too
            scores, index = None, None
    if scores is None:
        scores, index = logits.sort(dim=-1, descending=True)  # (B, V)
        if top_k < vocab:
            scores = scores.masked_fill(scores < scores[:, top_k - 1 : top_k], float("-inf"))
    if top_p < 1.0:
        scores = scores.masked_fill(_nucleus_drop(scores, top_p), float("-inf"))
    return scores, index


def _draw(logits: torch.Tensor, generators: Sequence[torch.Generator], **filters) -> torch.Tensor:
    """One code per row from ``softmax(filter_logits(logits))``, row ``i`` drawing only from
    ``generators[i]`` so that a row's sample never depends on the other rows. Returns ``[B]``."""
    scores, index = filtered_candidates(logits, **filters)
    probs = scores.softmax(dim=-1)  # (B, m)
    picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return index.gather(1, picks[:, None])[:, 0]


@contextmanager
def decoding_threads(dalle: DalleModel, rows: Optional[int]) -> Iterator[None]:
    """While decoding ``rows`` sequences on CPU through the numpy BLAS path of
    :func:`rudalle_pipe.dalle.linear`, run torch single-threaded so that its idle OpenMP workers do
    not spin against BLAS's threads (measured: 48 ms vs 16 ms per step for a hidden-2048 model on 2
    cores). The previous thread count is restored afterwards. ``rows=None`` changes nothing."""
    if rows is None or not uses_numpy_blas(dalle.device, dalle.dtype, rows):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def guided_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a doubled batch.

    Args:
        logits: ``[2B, V]`` raw image logits: rows ``0..B-1`` conditional (``c``), rows ``B..2B-1``
            their unconditional partners (``u``), in the same order.
        scale: the guidance scale ``s``.

    Returns:
        ``[B, V]`` float ``u + s * (c - u)``: ``s = 1`` is ``c``, ``s > 1`` pushes away from ``u``.
    """
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + scale * (cond - uncond)
