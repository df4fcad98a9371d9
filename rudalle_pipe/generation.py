"""Sampling images from a ruDALL-E generator: filters, the cached sampling loop, and
:func:`generate_images`.

Each step feeds only the newest image code through the model (a true key/value cache; see
:class:`rudalle_pipe.dalle.KVCache`) and computes logits for the image vocabulary of that one
position. Randomness comes from one ``torch.Generator`` per image, seeded from ``seed`` or from the
caller's ``generator``, so an image depends on its seed and never on ``batch_size``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .checks import MAX_IMAGES, check_count, check_float, check_int
from .dalle import DalleModel, DalleOutput, uses_numpy_blas
from .image_prompts import ImagePrompt

logger = logging.getLogger(__name__)

__all__ = ["GenerationOutput", "filter_logits", "sample_codes", "generate_images", "codes_to_images"]

_MAX_SEED = 2**63 - 1


@dataclass
class GenerationOutput:
    """Result of :func:`generate_images`.

    images: ``num_images`` PIL RGB images (256x256 for the Sber VQGAN, 512x512 with its DWT decoder).
    codes: ``[num_images, 1024]`` LongTensor of sampled VQGAN codes, row-major 32x32 grid.
    perplexities: one float per image, the original's definition: the mean over the image tokens of
        ``exp(cross-entropy)`` of the sampled code under the unfiltered model at temperature 1.
        Lower means the model found the image more likely. With an image prompt the mean runs over
        the generated positions only (the kept codes were not the model's choice).
    seeds: the seed of each image's generator; ``generate_images(..., seed=s, num_images=1)``
        reproduces the image whose seed is ``s``.
    """

    images: list[Image.Image]
    codes: torch.Tensor
    perplexities: list[float]
    seeds: list[int] = field(default_factory=list)


def check_sampling_args(*, top_k: int, top_p: float, temperature: float, vocab: int, num_images: int = 1,
                        batch_size: int = 1, seed: Optional[int] = None,
                        names: Optional[Mapping[str, str]] = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad value and the valid range, before any work.

    ``top_k`` in ``[1, vocab]``; ``top_p`` finite in ``(0, 1]``; ``temperature`` finite and ``> 0``;
    ``num_images`` and ``batch_size`` in ``[1, MAX_IMAGES]`` (4096); ``seed`` (unless None) in
    ``[0, 2**63 - 1 - num_images]``. ``names`` renames arguments in the messages (the command line
    passes its flags, e.g. ``{"top_p": "--top-p"}``)."""
    name = {k: k for k in ("top_k", "top_p", "temperature", "num_images", "batch_size", "seed")} | dict(names or {})
    check_int(name["top_k"], top_k, low=1, high=vocab)
    check_float(name["top_p"], top_p, low=0, high=1, low_open=True)
    check_float(name["temperature"], temperature, low=0, low_open=True)
    check_count(name["num_images"], num_images, high=MAX_IMAGES)
    check_count(name["batch_size"], batch_size, high=MAX_IMAGES)
    if seed is not None:
        check_int(name["seed"], seed, low=0, high=_MAX_SEED - num_images)


def check_image_prompt(prompt: object, dalle: DalleModel) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, mask)`` of ``prompt`` for ``sample_codes``'s ``forced_codes``/``forced_mask``, or a
    ``TypeError``/``ValueError`` when it is not an :class:`ImagePrompt`, its grid differs from the
    generator's (both sizes named), or a kept code is outside ``[0, image_vocab_size)``."""
    cfg = dalle.config
    if not isinstance(prompt, ImagePrompt):
        raise TypeError(f"image_prompt must be an ImagePrompt (ImagePrompt.from_borders / from_mask / from_codes), "
                        f"got {type(prompt).__name__}")
    if prompt.side != cfg.image_tokens_per_dim:
        raise ValueError(f"the image prompt's grid is {prompt.side}x{prompt.side} codes but the generator makes "
                         f"{cfg.image_tokens_per_dim}x{cfg.image_tokens_per_dim}; build the prompt with this "
                         "generator's VQGAN")
    kept = prompt.codes[prompt.mask]
    if int(kept.max()) >= cfg.image_vocab_size:
        raise ValueError(f"the image prompt keeps codes up to {int(kept.max())}, outside the generator's image "
                         f"vocabulary [0, {cfg.image_vocab_size})")
    return prompt.codes, prompt.mask


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


def seeds_for(num_images: int, seed: Optional[int], generator: Optional[torch.Generator]) -> list[int]:
    """One seed per image: ``seed + i``, or drawn from ``generator``, or fresh entropy if neither."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        check_int("seed", seed, low=0, high=_MAX_SEED - num_images)
        return [seed + i for i in range(num_images)]
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh entropy; the seeds are reported so the images can be reproduced
    return [int(s) for s in torch.randint(0, _MAX_SEED, (num_images,), generator=generator)]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``len(seeds)`` code grids for one tokenized text.

    Args:
        text_ids: ``[text_seq_length]`` LongTensor from ``tokenizer.encode_text``.
        seeds: one generator seed per image.
        forced_codes, forced_mask: optional ``[image_seq_length]`` codes and bool mask; where the
            mask is True the code is copied in instead of sampled (image prompts). A forced
            position draws nothing from the generators, so the other positions of an image depend
            only on its seed. At least one position must be left to sample.
        use_cache: False recomputes the whole sequence and its logits every step, as a model
            without a cache must (slow; for benchmarks and checks).

    Returns:
        ``codes [N, image_seq_length]`` LongTensor and ``perplexities [N]`` float tensor: the mean
        of ``exp(cross-entropy)`` over the sampled (not forced) positions.
    """
    cfg = dalle.config
    n_img = cfg.image_seq_length
    device = dalle.device
    text_ids = text_ids.to(device).view(1, -1)
    if text_ids.shape[1] != cfg.text_seq_length:
        raise ValueError(f"text_ids must have {cfg.text_seq_length} ids, got {text_ids.shape[1]}")
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
    bar = tqdm(total=len(seeds) * n_img, desc="generating", unit="tok", disable=not progress)
    for first in range(0, len(seeds), batch_size):
        batch_seeds = seeds[first : first + batch_size]
        B = len(batch_seeds)
        gens = [torch.Generator(device=device).manual_seed(s) for s in batch_seeds]
        codes = torch.zeros(B, n_img, dtype=torch.long, device=device)
        nll = torch.zeros(B, n_img, dtype=torch.float32, device=device)
        cache = dalle.init_cache(B) if use_cache else None
        prefix = text_ids.expand(B, -1)
        out = dalle(prefix, past_key_values=cache, use_cache=use_cache,
                    image_logits_only=True, last_only=True)  # prefill the text once
        with decoding_threads(dalle, B if use_cache else None):
            for p in range(n_img):
                logits = out.logits[:, -1].float()  # (B, vocab): image codes only
                if forced_mask[p]:
                    token = forced_codes[p].expand(B)
                else:
                    token = _draw(logits, gens, top_k=top_k, top_p=top_p, temperature=temperature)
                nll[:, p] = -logits.log_softmax(-1).gather(1, token[:, None])[:, 0]
                codes[:, p] = token
                bar.update(B)
                if p == n_img - 1:
                    break
                if use_cache:
                    out = dalle(token[:, None], past_key_values=cache, use_cache=True,
                                image_logits_only=True, last_only=True)
                else:  # what a model without a cache does: the whole sequence and all its logits again
                    full = dalle(torch.cat((prefix, codes[:, : p + 1]), dim=1)).logits  # (B, L, V_text + V_image)
                    out = DalleOutput(logits=full[:, -1:, cfg.vocab_size :])
        all_codes.append(codes.cpu())
        all_ppl.append(nll[:, sampled.to(device)].exp().mean(dim=1).cpu())
    bar.close()
    return torch.cat(all_codes), torch.cat(all_ppl)


@torch.inference_mode()
def codes_to_images(vae, codes: torch.Tensor, *, batch_size: int = 8) -> list[Image.Image]:
    """Decode ``codes [N, h*w]`` with ``vae.decode`` (images in [0, 1]) into PIL RGB images."""
    device = next(vae.parameters()).device
    images = []
    for first in range(0, codes.shape[0], batch_size):
        pixels = vae.decode(codes[first : first + batch_size].to(device)).float().clamp(0, 1)  # (b, 3, H, W)
        array = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(a) for a in array)
    return images


def generate_images(
    text: str,
    tokenizer,
    dalle: DalleModel,
    vae,
    *,
    top_k: int,
    top_p: float,
    num_images: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    use_cache: bool = True,
    progress: bool = True,
    image_prompt: Optional[ImagePrompt] = None,
) -> GenerationOutput:
    """Generate ``num_images`` pictures for ``text``, like the original ``generate_images``.

    Steps: 1. normalise and tokenize the text (lowercase, strip, 128 ids); 2. pick one seed per image;
    3. sample 1024 codes per image with the cache; 4. decode them with the VQGAN.

    Args:
        text: the prompt (Russian for the ruDALL-E models).
        tokenizer: from :func:`rudalle_pipe.get_tokenizer`.
        dalle: from :func:`rudalle_pipe.get_rudalle_model`.
        vae: from :func:`rudalle_pipe.get_vae`.
        top_k: keep the k most likely image codes, in ``[1, 8192]``; ``top_k=1`` is greedy.
        top_p: nucleus threshold in ``(0, 1]``. Recommended pairs: 2048/0.995, 1536/0.99, 1024/0.99.
        num_images: how many images, in ``[1, 4096]`` (``checks.MAX_IMAGES``).
        temperature: finite, > 0; divides the logits before the filters.
        batch_size: images sampled together, in ``[1, 4096]``; changes speed and memory, never the images.
        generator: seeds are drawn from it (reproducible); or give ``seed`` (image i gets seed+i).
        use_cache: keep True; False recomputes the whole sequence at every step.
        progress: show a tqdm bar.
        image_prompt: an :class:`~rudalle_pipe.ImagePrompt` whose grid matches the generator's
            (``side == image_tokens_per_dim``) and whose kept codes are in
            ``[0, image_vocab_size)``. Its kept codes are copied into every image and never sampled
            (drawing no randomness, so an image still depends only on its seed); the other positions
            are sampled in raster order. Perplexities then average over the generated positions only.
    """
    from .tokenizer import prepare_text

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    check_sampling_args(top_k=top_k, top_p=top_p, temperature=temperature, vocab=dalle.config.image_vocab_size,
                        num_images=num_images, batch_size=batch_size, seed=seed)
    forced_codes, forced_mask = check_image_prompt(image_prompt, dalle) if image_prompt is not None else (None, None)
    if unknown := getattr(tokenizer, "unknown_words", lambda _: [])(text):  # words outside tokenizer.vocabulary
        logger.warning("prompt %r has words the generator was not trained on: %s", text, ", ".join(unknown))
    text_ids = tokenizer.encode_text(prepare_text(text), dalle.config.text_seq_length)
    seeds = seeds_for(num_images, seed, generator)
    logger.info("generating %d images for %r (top_k=%d, top_p=%s, temperature=%s)",
                num_images, text, top_k, top_p, temperature)
    codes, ppl = sample_codes(dalle, text_ids, seeds=seeds, top_k=top_k, top_p=top_p,
                              temperature=temperature, batch_size=batch_size, use_cache=use_cache,
                              forced_codes=forced_codes, forced_mask=forced_mask, progress=progress)
    images = codes_to_images(vae, codes, batch_size=batch_size)
    return GenerationOutput(images=images, codes=codes, perplexities=ppl.tolist(), seeds=seeds)


def empty_text_ids(length: int) -> torch.Tensor:
    """The empty text: ``[length]`` LongTensor of pads (zeros). Classifier-free guidance's default
    unconditional prompt, and what caption dropout trains on."""
    return torch.zeros(length, dtype=torch.long)
