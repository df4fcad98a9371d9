"""The cached sampling loop :func:`sample_codes` and its step's pieces: the logit filters, the per-row
draw, the classifier-free guidance mix, the empty text of the unconditional rows, and the thread
setting of CPU decoding. Every name here is re-exported from :mod:`rudalle_pipe.generation` too.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tqdm.auto import tqdm

from .checks import check_count, check_float, check_int
from .backend import cpu_decoding, decoding_threads
from .dalle import DalleModel, KVCache
from .static_decode import StaticDecoder, resolve_decoder
from .previews import GenerationCancelled, StepCallback, run_callback

__all__ = ["sample_codes", "filter_logits", "filtered_candidates", "guided_logits", "empty_text_ids",
           "decoding_threads"]

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
    ``generators[i]`` so that a row's sample never depends on the other rows. Returns ``[B]``.

    On CUDA nothing is read back to the host, so steps queue up behind each other: the filter runs over
    the whole vocabulary (the compact path's tie check would read a count back), and each row draws
    with the exponential race that ``torch.multinomial`` runs for one sample, without its host-side
    check of the probabilities: ``argmax(p / e)``, ``e ~ Exp(1)`` from the row's generator."""
    if logits.device.type == "cuda":
        return race_draw(filter_logits(logits, **filters).softmax(dim=-1), generators)
    scores, index = filtered_candidates(logits, **filters)
    probs = scores.softmax(dim=-1)  # (B, m)
    picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
    return index.gather(1, picks[:, None])[:, 0]


def race_draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One index per row of ``probs [B, V]`` (rows sum to 1): ``argmax(p / e)`` with ``e ~ Exp(1)``
    drawn from ``generators[i]`` for row ``i``. That is the race ``torch.multinomial(p, 1)`` runs (it
    picks index ``j`` with probability ``p_j``), minus its check of ``p`` that reads back to the host.
    Returns ``[B]``."""
    race = torch.stack([torch.empty_like(probs[0]).exponential_(1, generator=g) for g in generators])
    return (probs / race).argmax(dim=-1)


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


def _per_row(ids: torch.Tensor, rows: int, length: int, name: str) -> torch.Tensor:
    """``ids`` ``[length]`` (one text for every row, expanded) or ``[rows, length]`` (one per row)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        raise TypeError(f"{name} must be a LongTensor [{length}] or [{rows}, {length}], got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if tuple(ids.shape) == (length,):
        return ids.view(1, -1).expand(rows, -1)
    if tuple(ids.shape) == (rows, length):
        return ids
    raise ValueError(f"{name} must have shape [{length}] or [{rows}, {length}] (text_seq_length ids, one row per "
                     f"seed), got {tuple(ids.shape)}")


@torch.inference_mode()
def sample_codes(
    dalle: DalleModel,
    text_ids: torch.Tensor,
    *,
    seeds: Sequence[int],
    top_k: int,
    top_p: float,
    temperature: float = 1.0,
    batch_size: int = 8,
    use_cache: bool = True,
    forced_codes: Optional[torch.Tensor] = None,
    forced_mask: Optional[torch.Tensor] = None,
    progress: bool = True,
    guidance_scale: float = 1.0,
    uncond_ids: Optional[torch.Tensor] = None,
    callback: Optional[StepCallback] = None,
    callback_steps: int = 1,
    decoder: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``len(seeds)`` code grids.

    Args:
        text_ids: ``[text_seq_length]`` LongTensor from ``tokenizer.encode_text`` (one text for every
            image) or ``[len(seeds), text_seq_length]`` (row ``i`` is image ``i``'s text). Rows of
            different texts share batches.
        seeds: one generator seed per image.
        forced_codes, forced_mask: optional ``[image_seq_length]`` codes and bool mask; where the
            mask is True the code is copied in instead of sampled (image prompts). A forced
            position draws nothing from the generators, so the other positions of an image depend
            only on its seed. At least one position must be left to sample.
        use_cache: False recomputes the whole sequence and its logits every step, as a model
            without a cache must (slow; for benchmarks and checks).
        guidance_scale: ``s`` in ``(0, 50]``. ``1`` runs the plain conditional model (``B`` rows).
            Otherwise each row gets an unconditional partner (text ``uncond_ids``) in one doubled
            batch of ``2B`` rows and one key/value cache; codes are drawn from
            ``u + s * (c - u)`` (:func:`~rudalle_pipe.sampling.guided_logits`, before temperature and
            filters) and fed to both rows of the pair.
        uncond_ids: the partners' text, ``[text_seq_length]`` or one row per seed; default
            :func:`empty_text_ids` (all pads). Only with ``guidance_scale != 1``.
        callback, callback_steps: see :func:`~rudalle_pipe.previews.run_callback`; called after
            every ``callback_steps``-th position of each batch and after its last one.
        decoder: ``"dynamic"`` (attend over the positions so far), ``"static"`` (fixed shapes; on
            CUDA one captured graph per batch, see :mod:`rudalle_pipe.static_decode`) or ``"auto"``
            (static on CUDA and for bf16/fp16 models, dynamic for fp32 on CPU). Both sample the same distribution; their logits
            differ by float rounding only.

    Returns:
        ``codes [N, image_seq_length]`` LongTensor and ``perplexities [N]`` float tensor: the mean
        of ``exp(cross-entropy)`` over the sampled (not forced) positions, always under the
        *conditional* logits ``c`` (unguided, unfiltered, temperature 1).

    Raises:
        GenerationCancelled: the callback cancelled (the partial codes are on the exception).
    """
    cfg = dalle.config
    n_img, T = cfg.image_seq_length, cfg.text_seq_length
    device = dalle.device
    check_float("guidance_scale", guidance_scale, low=0, high=MAX_GUIDANCE, low_open=True)
    guided = guidance_scale != 1.0
    if uncond_ids is not None and not guided:
        raise ValueError("uncond_ids has no effect with guidance_scale=1 (no guidance): drop it or pass "
                         "guidance_scale != 1")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as fn(step, total_steps, codes), got {type(callback).__name__}")
    check_int("callback_steps", callback_steps, low=1, high=n_img)
    decoder = resolve_decoder(decoder, device, use_cache, dalle.dtype)
    if callback is None and callback_steps != 1:
        raise ValueError(f"callback_steps={callback_steps} has no effect without a callback")
    text_ids = _per_row(text_ids, len(seeds), T, "text_ids").to(device)
    uncond = _per_row(empty_text_ids(T) if uncond_ids is None else uncond_ids, len(seeds), T, "uncond_ids")
    uncond = uncond.to(device) if guided else None
    if forced_mask is None:
        forced_mask = torch.zeros(n_img, dtype=torch.bool)
    forced_mask = forced_mask.cpu().bool()
    if tuple(forced_mask.shape) != (n_img,):
        raise ValueError(f"forced_mask must be a [{n_img}] bool tensor, got shape {tuple(forced_mask.shape)}")
    if forced_mask.all():
        raise ValueError(f"forced_mask forces all {n_img} positions: nothing is left to sample")
    sampled = ~forced_mask  # the positions whose codes the model chooses (perplexity runs over these)
    if forced_mask.any():
        if forced_codes is None or forced_codes.shape != (n_img,):
            raise ValueError(f"forced_codes must be a [{n_img}] LongTensor when forced_mask is set")
        forced_codes = forced_codes.to(device)
    all_codes, all_ppl = [], []
    step, reason = n_img, None
    bar = tqdm(total=len(seeds) * n_img, desc="generating", unit="tok", disable=not progress)
    try:
        for first in range(0, len(seeds), batch_size):
            rows = slice(first, first + batch_size)
            codes, nll, step, reason = _sample_batch(
                dalle, text_ids[rows], None if uncond is None else uncond[rows], seeds[rows],
                filters=dict(top_k=top_k, top_p=top_p, temperature=temperature), guidance_scale=guidance_scale,
                use_cache=use_cache, forced_codes=forced_codes, forced_mask=forced_mask, bar=bar,
                callback=callback, callback_steps=callback_steps, static=decoder == "static")
            all_codes.append(codes)
            all_ppl.append(nll[:, sampled].exp().mean(dim=1))
            if reason is not None:
                break
    finally:
        bar.close()
    codes = torch.cat(all_codes)
    if reason is not None:  # no frame on the way out holds the cache (it lived in _sample_batch)
        num_complete = len(codes) if step == n_img else len(codes) - len(all_codes[-1])
        raise GenerationCancelled(reason, codes=codes, step=step, num_complete=num_complete,
                                  seeds=list(seeds[: len(codes)]))
    return codes, torch.cat(all_ppl)


def _prefill(dalle: DalleModel, prefix: torch.Tensor, use_cache: bool) -> tuple[torch.Tensor, Optional[KVCache]]:
    """The texts ``prefix [R, T]`` through the model: the last position's image logits ``[R, V_img]`` and, with
    ``use_cache``, a cache of ``R`` rows holding them. Each distinct text runs once and its cache rows are
    copied to the rows that repeat it: ``num_images`` pictures of one prompt (and the unconditional rows of
    guidance, all alike) share one prefill, which at Malevich shape and batch 8 took 3.5 of 105 s."""
    rows, inverse = prefix, None  # the rows the model runs on; inverse maps them back to prefix's
    if use_cache:
        unique, repeats = torch.unique(prefix, dim=0, return_inverse=True)  # (U, T), (R,)
        if len(unique) < len(prefix):
            rows, inverse = unique, repeats
    cache = dalle.init_cache(len(rows)) if use_cache else None
    with cpu_decoding(dalle, rows.numel()):  # the CPU backend only where the prefill is a few rows
        logits = dalle(rows, past_key_values=cache, use_cache=use_cache, image_logits_only=True,
                       last_only=True).logits[:, -1]
    if inverse is None:
        return logits, cache
    cache.reorder(inverse)
    return logits.index_select(0, inverse), cache


def _sample_batch(dalle: DalleModel, text: torch.Tensor, uncond: Optional[torch.Tensor], seeds: Sequence[int], *,
                  filters: dict, guidance_scale: float, use_cache: bool, forced_codes: Optional[torch.Tensor],
                  forced_mask: torch.Tensor, bar, callback: Optional[StepCallback], callback_steps: int,
                  static: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, Optional[str]]:
    """One batch of :func:`sample_codes`: ``text [B, T]`` (and ``uncond [B, T]`` when guided).

    Returns CPU ``codes [B, n]``, ``nll [B, n]`` (under the conditional logits), the positions drawn
    and the cancel reason (None when the batch ran to the end). The cache lives only in this frame;
    on an exception it is dropped before the exception leaves, so a kept traceback does not hold it.
    """
    cfg = dalle.config
    n_img, device, B = cfg.image_seq_length, dalle.device, len(seeds)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    codes = torch.zeros(B, n_img, dtype=torch.long, device=device)
    nll = torch.zeros(B, n_img, dtype=torch.float32, device=device)
    prefix = text if uncond is None else torch.cat((text, uncond))  # (R, T): R = B, or 2B pairs (i, B + i)
    R = prefix.shape[0]
    step = cache = None
    try:
        logits, cache = _prefill(dalle, prefix, use_cache)  # (R, vocab), image codes only
        step = StaticDecoder(dalle, cache) if static else None
        with cpu_decoding(dalle, R if use_cache else None):  # selects the CPU decode backend (backend.py)
            for p in range(n_img):
                logits = logits.float()
                cond = logits[:B]
                if forced_mask[p]:
                    token = forced_codes[p].expand(B)
                else:
                    mixed = cond if uncond is None else guided_logits(logits, guidance_scale)
                    token = _draw(mixed, gens, **filters)
                nll[:, p] = -cond.log_softmax(-1).gather(1, token[:, None])[:, 0]
                codes[:, p] = token
                bar.update(B)
                if callback is not None and ((p + 1) % callback_steps == 0 or p + 1 == n_img):
                    reason = run_callback(callback, p + 1, n_img, codes)
                    if reason is not None:
                        return codes.cpu(), nll.cpu(), p + 1, reason
                if p == n_img - 1:
                    break
                feed = token if uncond is None else token.repeat(2)  # (R,): a pair gets the same code
                if step is not None:
                    logits = step(feed)
                elif use_cache:
                    logits = dalle(feed[:, None], past_key_values=cache, use_cache=True,
                                   image_logits_only=True, last_only=True).logits[:, -1]
                else:  # what a model without a cache does: the whole sequence and all its logits again
                    seen = codes[:, : p + 1].repeat(R // B, 1)
                    with cpu_decoding(dalle, R * (prefix.shape[1] + p + 1)):
                        logits = dalle(torch.cat((prefix, seen), dim=1)).logits[:, -1, cfg.vocab_size:]
    except BaseException:
        cache = step = logits = None  # noqa: F841 -- the traceback keeps this frame, not the cache
        raise
    return codes.cpu(), nll.cpu(), n_img, None
