"""Sampling images from a ruDALL-E generator: :func:`generate_images` and its argument checks.

Each step feeds only the newest image code through the model (a true key/value cache; see
:class:`rudalle_pipe.dalle.KVCache`) and computes logits for the image vocabulary of that one
position. Randomness comes from one ``torch.Generator`` per image, seeded from ``seed`` or from the
caller's ``generator``, so an image depends on its seed and never on ``batch_size`` or on the other
rows of its batch (each row carries its own text). The sampling loop and its step's pieces (filters,
draw, guidance mix) live in :mod:`rudalle_pipe.sampling`, previews and cancellation in
:mod:`rudalle_pipe.previews`; their names are re-exported here.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from PIL import Image

from .checks import MAX_IMAGES, check_count, check_float, check_int
from .dalle import DalleModel
from .image_prompts import ImagePrompt
from .previews import GenerationCancelled, StepCallback, preview_images  # noqa: F401
from .static_decode import resolve_decoder
from .sampling import (MAX_GUIDANCE, _draw, _nucleus_drop, decoding_threads, empty_text_ids,  # noqa: F401
                       filter_logits, filtered_candidates, guided_logits, sample_codes)

logger = logging.getLogger(__name__)

__all__ = ["GenerationOutput", "GenerationCancelled", "filter_logits", "sample_codes", "generate_images",
           "codes_to_images", "empty_text_ids", "preview_images"]

_MAX_SEED = 2**63 - 1


@dataclass
class GenerationOutput:
    """Result of :func:`generate_images`.

    images: ``len(prompts) * num_images`` PIL RGB images (256x256 for the Sber VQGAN, 512x512 with its
        DWT decoder), prompt 0's first.
    codes: ``[images, 1024]`` LongTensor of sampled VQGAN codes, row-major 32x32 grid.
    perplexities: one float per image, the original's definition: the mean over the image tokens of
        ``exp(cross-entropy)`` of the sampled code under the unfiltered model at temperature 1.
        Lower means the model found the image more likely. With an image prompt the mean runs over
        the generated positions only (the kept codes were not the model's choice).
    seeds: the seed of each image's generator; ``generate_images(..., seed=s, num_images=1)``
        reproduces the image whose seed is ``s``.
    prompts: the prompt of each image, as the caller wrote it (before lowercasing), in output order.
    """

    images: list[Image.Image]
    codes: torch.Tensor
    perplexities: list[float]
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


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


def check_guidance(guidance_scale: float, negative_prompt: Optional[str],
                   names: Optional[Mapping[str, str]] = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad value, before any work: ``guidance_scale`` finite in
    ``(0, MAX_GUIDANCE]``; ``negative_prompt`` None, or a str that is not blank and comes with guidance
    (``guidance_scale != 1``: without guidance nothing reads it). ``names`` renames the two in the messages, as
    in :func:`check_sampling_args` (the command line passes its flags, the web page its labels)."""
    name = {"guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt"} | dict(names or {})
    scale, negative = name["guidance_scale"], name["negative_prompt"]
    check_float(scale, guidance_scale, low=0, high=MAX_GUIDANCE, low_open=True)
    if negative_prompt is None:
        return
    if not isinstance(negative_prompt, str):
        raise TypeError(f"{negative} must be a str or None, got {type(negative_prompt).__name__}")
    if not negative_prompt.strip():
        raise ValueError(f"{negative} is blank; leave it out to guide against the empty text (all pads)")
    if guidance_scale == 1.0:
        raise ValueError(f"{negative} {negative_prompt!r} has no effect without guidance ({scale} 1): give {scale} "
                         f"a value other than 1, e.g. 3, or leave {negative} out")


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


def seeds_for(num_images: int, seed: Optional[int], generator: Optional[torch.Generator]) -> list[int]:
    """One seed per image: ``seed + i``, or drawn from ``generator`` (on its own device: a CUDA
    generator draws other seeds than a CPU one seeded alike), or fresh entropy if neither."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        check_int("seed", seed, low=0, high=_MAX_SEED - num_images)
        return [seed + i for i in range(num_images)]
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh entropy; the seeds are reported so the images can be reproduced
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    drawn = torch.randint(0, _MAX_SEED, (num_images,), generator=generator, device=generator.device)
    return [int(s) for s in drawn.tolist()]


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


def check_prompts(text: object) -> list[str]:
    """``[text]`` for a str, ``list(text)`` for a non-empty list/tuple of str; else ``TypeError``/``ValueError``
    naming the bad element."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, SequenceABC) or isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text must be a str or a non-empty list of str, got {type(text).__name__}")
    if len(text) == 0:
        raise ValueError("text is an empty list: pass at least one prompt")
    for i, t in enumerate(text):
        if not isinstance(t, str):
            raise TypeError(f"text[{i}] must be a str, got {type(t).__name__}")
    return list(text)


def generate_images(
    text: Union[str, Sequence[str]],
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
    guidance_scale: float = 1.0,
    negative_prompt: Optional[str] = None,
    callback: Optional[StepCallback] = None,
    callback_steps: int = 1,
    decoder: str = "auto",
) -> GenerationOutput:
    """Generate ``num_images`` pictures for ``text`` (or for each prompt of a list), like the original
    ``generate_images``.

    Steps: 1. normalise and tokenize each text (lowercase, strip, 128 ids); 2. pick one seed per image;
    3. sample 1024 codes per image with the cache; 4. decode them with the VQGAN.

    Args:
        text: the prompt (Russian for the ruDALL-E models), or a non-empty list of prompts. Output
            order is prompt 0's images, then prompt 1's, ...; rows of different prompts share
            batches, each with its own text.
        tokenizer: from :func:`rudalle_pipe.get_tokenizer`.
        dalle: from :func:`rudalle_pipe.get_rudalle_model`.
        vae: from :func:`rudalle_pipe.get_vae`.
        top_k: keep the k most likely image codes, in ``[1, 8192]``; ``top_k=1`` is greedy.
        top_p: nucleus threshold in ``(0, 1]``. Recommended pairs: 2048/0.995, 1536/0.99, 1024/0.99.
        num_images: images *per prompt*, in ``[1, 4096]``; ``len(text) * num_images`` must be
            ``<= 4096`` (``checks.MAX_IMAGES``).
        temperature: finite, > 0; divides the (guided) logits before the filters.
        batch_size: images sampled together, in ``[1, 4096]``; changes speed and memory, never the
            images (with guidance a batch runs ``2 * batch_size`` rows).
        generator: the ``len(text) * num_images`` seeds are drawn from it (reproducible); or give
            ``seed``: image ``j`` of prompt ``i`` gets seed ``seed + i * num_images + j`` (a single
            str: image ``j`` gets ``seed + j``), and the same seed gives the same image whatever the
            batch size and whatever other prompts share its batch.
        use_cache: keep True; False recomputes the whole sequence at every step.
        progress: show a tqdm bar.
        image_prompt: an :class:`~rudalle_pipe.ImagePrompt` whose grid matches the generator's
            (``side == image_tokens_per_dim``) and whose kept codes are in
            ``[0, image_vocab_size)``. Its kept codes are copied into every image (and into both
            rows of a guided pair) and never sampled (drawing no randomness, so an image still
            depends only on its seed); the other positions are sampled in raster order.
            Perplexities then average over the generated positions only.
        guidance_scale: classifier-free guidance scale ``s``, finite in ``(0, 50]``. ``1`` (default)
            is plain sampling, bit-identical to no guidance and with no doubled batch. Otherwise each
            image's row is paired with an unconditional row in one doubled batch sharing one
            key/value cache; the code is drawn from ``u + s * (c - u)`` of the image logits (then
            temperature, top-k, top-p, with the image's own generator) and fed to both rows.
            ``s > 1`` follows the prompt more strictly (dalle-mini's super-conditioning; 2-5 are
            typical), ``s < 1`` weakens it. The perplexities stay the conditional model's (``c``).
            The unconditional text is ``negative_prompt``, or the empty text
            (:func:`empty_text_ids`: every position a pad). The ruDALL-E checkpoints never saw
            dropped captions, so for them the empty-text unconditional is an approximation (as in
            dalle-mini's super-conditioning); a model trained with caption dropout to the empty text
            (the bundled demo) has a real one.
        negative_prompt: a non-blank str, tokenized like the prompt, used as the unconditional
            text of every row: guidance pushes away from it. Only with ``guidance_scale != 1``.
        callback: ``fn(step, total_steps, codes)`` called every ``callback_steps`` positions of
            each batch and at its last one: ``step`` is the number of positions drawn in the current
            batch (``1..total_steps``, forced positions included), ``total_steps`` is
            ``image_seq_length`` (1024), ``codes`` a copy ``[B, image_seq_length]`` of the current
            batch's rows (output rows ``first .. first + B - 1``, batches in output order), undrawn
            positions 0; feed it to :func:`preview_images`. Returning ``False`` or raising
            :class:`GenerationCancelled` cancels; other exceptions propagate unchanged.
        callback_steps: in ``[1, image_seq_length]``; only with a callback.
        decoder: how a cached step runs: ``"auto"`` (default: ``"static"`` on CUDA and for bf16/fp16
            models, ``"dynamic"`` for fp32 on CPU), ``"dynamic"`` (attention over the positions so far; the CPU path) or
            ``"static"`` (fixed shapes, replayed as one CUDA graph per batch on a GPU; see
            :mod:`rudalle_pipe.static_decode`). Same distribution; logits differ by rounding only.

    On a GPU, the same seed gives the same image for the same batch size; another batch size can change
    the float rounding of the products (cuBLAS picks kernels by shape), and a code whose top
    candidates nearly tie can then come out differently: ``benchmarks/gpu_check.sh`` measures how
    often. On CPU the images never depend on the batch size.

    Raises:
        GenerationCancelled: the callback cancelled. ``.codes`` holds the finished batches' rows then
            the cancelled batch's partial rows, ``.step`` the positions drawn in those, and
            ``.num_complete``, ``.seeds``, ``.prompts`` describe the rows. The bar is closed, the
            thread count restored and no reference to the key/value cache is kept.
    """
    from .tokenizer import prepare_text

    prompts = check_prompts(text)
    cfg = dalle.config
    check_sampling_args(top_k=top_k, top_p=top_p, temperature=temperature, vocab=cfg.image_vocab_size,
                        num_images=num_images, batch_size=batch_size, seed=seed)
    total = check_int("len(text) * num_images", len(prompts) * num_images, high=MAX_IMAGES)
    check_guidance(guidance_scale, negative_prompt)
    resolve_decoder(decoder, dalle.device, use_cache, dalle.dtype)
    forced_codes, forced_mask = check_image_prompt(image_prompt, dalle) if image_prompt is not None else (None, None)
    for prompt in prompts:  # words outside tokenizer.vocabulary
        if unknown := getattr(tokenizer, "unknown_words", lambda _: [])(prompt):
            logger.warning("prompt %r has words the generator was not trained on: %s", prompt, ", ".join(unknown))
    seeds = seeds_for(total, seed, generator)
    encoded = [tokenizer.encode_text(prepare_text(t), cfg.text_seq_length) for t in prompts]
    text_ids = torch.stack(encoded).repeat_interleave(num_images, dim=0)  # (total, T): one text per image
    uncond_ids = None if negative_prompt is None else tokenizer.encode_text(prepare_text(negative_prompt),
                                                                             cfg.text_seq_length)
    image_prompts = [t for t in prompts for _ in range(num_images)]
    logger.info("generating %d images for %r (top_k=%d, top_p=%s, temperature=%s, guidance_scale=%s)",
                total, prompts[0] if len(prompts) == 1 else prompts, top_k, top_p, temperature, guidance_scale)
    try:
        codes, ppl = sample_codes(dalle, text_ids, seeds=seeds, top_k=top_k, top_p=top_p,
                                  temperature=temperature, batch_size=batch_size, use_cache=use_cache,
                                  forced_codes=forced_codes, forced_mask=forced_mask, progress=progress,
                                  guidance_scale=guidance_scale, uncond_ids=uncond_ids,
                                  callback=callback, callback_steps=callback_steps, decoder=decoder)
    except GenerationCancelled as cancelled:
        cancelled.prompts = image_prompts[: len(cancelled.seeds)]
        raise
    images = codes_to_images(vae, codes, batch_size=batch_size)
    return GenerationOutput(images=images, codes=codes, perplexities=ppl.tolist(), seeds=seeds,
                            prompts=image_prompts)
