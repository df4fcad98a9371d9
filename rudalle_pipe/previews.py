"""Live previews and cancellation of :func:`rudalle_pipe.generate_images`.

``generate_images(..., callback=fn, callback_steps=N)`` calls ``fn(step, total_steps, codes)``
while it samples (see :func:`run_callback` for exactly when and with what); ``fn`` may cancel, and
:func:`preview_images` turns its ``codes`` into pictures a UI can stream.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from .checks import check_int

__all__ = ["GenerationCancelled", "StepCallback", "preview_images", "run_callback"]

StepCallback = Callable[[int, int, torch.Tensor], Optional[bool]]

GREY = 0.5  # the neutral fill of undrawn cells in previews, in [0, 1] pixel space


class GenerationCancelled(Exception):
    """Raised by ``generate_images`` when its callback returns ``False`` or raises this class.

    A callback may raise it bare (``raise GenerationCancelled("user pressed stop")``); the exception
    that reaches the caller is a new one whose message keeps that reason and whose fields are filled:

    Attributes:
        codes: ``[M, image_seq_length]`` LongTensor on the CPU: the rows of every batch sampled
            before the cancelled one (complete grids), then the rows of the cancelled batch, whose
            first ``step`` positions (raster order) are drawn and the rest 0. ``M`` is at most the
            number of images asked for.
        step: positions drawn in the cancelled batch's rows (the callback's ``step``).
        num_complete: how many leading rows of ``codes`` are complete grids (``M`` when
            ``step == image_seq_length``).
        seeds: the seed of each row of ``codes``.
        prompts: the prompt of each row of ``codes`` (filled by ``generate_images``; empty when raised
            by ``sample_codes``).
        reason: the message of the callback's exception, or ``"callback returned False"``.
    """

    def __init__(self, reason: str = "", *, codes: Optional[torch.Tensor] = None, step: int = 0,
                 num_complete: int = 0, seeds: Sequence[int] = (), prompts: Sequence[str] = ()) -> None:
        super().__init__(reason or "generation cancelled")
        self.reason = reason
        self.codes = codes
        self.step = step
        self.num_complete = num_complete
        self.seeds = list(seeds)
        self.prompts = list(prompts)


def run_callback(callback: StepCallback, step: int, total_steps: int, codes: torch.Tensor) -> Optional[str]:
    """Call ``callback(step, total_steps, codes.cpu().clone())``; return the cancel reason or None.

    ``step``: positions drawn so far in the current batch, ``1..total_steps`` (forced image-prompt
    positions count as drawn); ``total_steps``: ``image_seq_length`` (1024 for ruDALL-E);
    ``codes``: a copy ``[B, image_seq_length]`` of the current batch, undrawn positions 0. Each batch
    counts from 1 again. The callback returns None/True to go on, False to cancel, or raises
    :class:`GenerationCancelled` to cancel; any other return value is a ``TypeError`` and any other
    exception propagates unchanged.
    """
    try:
        answer = callback(step, total_steps, codes.cpu().clone())
    except GenerationCancelled as err:
        return err.reason or "callback raised GenerationCancelled"
    if answer is False:
        return "callback returned False"
    if answer is not None and answer is not True:
        raise TypeError(f"the callback must return None, True (go on) or False (cancel), got {answer!r} "
                        f"({type(answer).__name__})")
    return None


@torch.inference_mode()
def preview_images(codes: torch.Tensor, vae, step: int) -> list[Image.Image]:
    """Pictures of partially drawn code grids, as a callback receives them.

    Positions ``0..step-1`` (raster order) are decoded as drawn. Each undrawn position first takes the
    code of the nearest drawn position above it in its column (or the last drawn code when its
    column has none yet, code 0 when ``step == 0``), so that the decoder's receptive field sees
    plausible neighbours at the boundary instead of arbitrary code 0; the grid is decoded, and then
    the pixels of every undrawn cell are painted mid-grey (0.5). So drawn cells look as drawn (up to
    the decoder's blending across the boundary) and the rest is a flat neutral grey.

    Args:
        codes: ``[B, n]`` integer tensor, ``n = side**2`` the VQGAN's code grid (the callback's
            ``codes``), values in ``[0, vae.config.n_embed)`` at the drawn positions.
        vae: the VQGAN (``decode``, ``config.n_embed``).
        step: drawn positions, in ``[0, n]``.

    Returns:
        ``B`` RGB PIL images of the VQGAN's output size (``8 * side`` px for the Sber VQGAN).
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a [batch, positions] integer tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be [batch, side*side], got shape {tuple(codes.shape)}")
    B, n = codes.shape
    side = math.isqrt(n)
    if side * side != n or B == 0:
        raise ValueError(f"codes must be [batch >= 1, side*side], got shape {tuple(codes.shape)}")
    check_int("step", step, low=0, high=n)
    vocab = vae.config.n_embed
    drawn = codes[:, :step].long().cpu()
    if drawn.numel() and (int(drawn.min()) < 0 or int(drawn.max()) >= vocab):
        raise ValueError(f"drawn codes must be in [0, {vocab}), got values in [{int(drawn.min())}, {int(drawn.max())}]")
    filled = torch.zeros(B, n, dtype=torch.long)
    filled[:, :step] = drawn
    for q in range(step, n):  # same column, nearest drawn row above; else the last drawn code
        above = q - side * ((q - step) // side + 1)
        filled[:, q] = filled[:, above] if above >= 0 else (filled[:, step - 1] if step else 0)
    device = next(vae.parameters()).device
    pixels = vae.decode(filled.to(device)).float().clamp(0, 1).cpu()  # (B, 3, H, W)
    cell = pixels.shape[-1] // side
    undrawn = (torch.arange(n) >= step).view(side, side)
    pixels[:, :, undrawn.repeat_interleave(cell, 0).repeat_interleave(cell, 1)] = GREY
    array = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]
