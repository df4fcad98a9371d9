"""Sparse attention masks of ruDALL-E, as pure functions.

Every mask is a bool tensor of shape ``[T + n*n, T + n*n]`` indexed ``[query, key]`` (True = may
attend), where ``T`` is the number of text positions and ``n`` the image side in tokens. All masks
are causal, and text queries see all earlier text. They differ in what an *image* query sees of
earlier *image* keys:

* ``row``: the previous ``n`` image tokens and itself (a sliding window one image row long).
* ``col``: earlier image tokens in its own column (distance a multiple of ``n``).
* ``conv``: earlier image tokens in the ``kernel x kernel`` window around it; ``v3`` clips the
  window at the image borders, ``v2`` wraps it around modulo ``n``.

The builders are vectorised; ``tests/test_masks.py`` checks them against the original's masks.
"""
from __future__ import annotations

import torch

__all__ = ["row_mask", "col_mask", "conv_mask", "layer_mask_kinds", "build_masks"]


def _image_grid(text_tokens: int, image_tokens_per_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (causal [S, S] bool, image-pair [S, S] bool) for S = text + n*n positions, on the default device,
    but on the CPU inside a ``torch.device("meta")`` context (the loaders replace them with the stored masks)."""
    size = text_tokens + image_tokens_per_dim**2
    device = torch.empty(0).device  # the default device (a `with torch.device(...)` context), but never meta
    device = torch.device("cpu") if device.type == "meta" else device
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril_()
    is_image = torch.arange(size, device=device) >= text_tokens
    both_image = is_image[:, None] & is_image[None, :]  # (S, S): query and key are image tokens
    return causal, both_image


def row_mask(text_tokens: int, image_tokens_per_dim: int) -> torch.Tensor:
    """Causal mask whose image queries see all text and the previous ``n`` image tokens."""
    causal, both_image = _image_grid(text_tokens, image_tokens_per_dim)
    pos = torch.arange(causal.shape[0], device=causal.device)
    dist = pos[:, None] - pos[None, :]  # (S, S) query - key
    return causal & ~(both_image & (dist > image_tokens_per_dim))


def col_mask(text_tokens: int, image_tokens_per_dim: int) -> torch.Tensor:
    """Causal mask whose image queries see all text and earlier image tokens of their column."""
    causal, both_image = _image_grid(text_tokens, image_tokens_per_dim)
    pos = torch.arange(causal.shape[0], device=causal.device)
    dist = pos[:, None] - pos[None, :]
    return causal & ~(both_image & (dist % image_tokens_per_dim != 0))


def conv_mask(
    text_tokens: int, image_tokens_per_dim: int, *, kernel: int = 11, hf_version: str = "v3"
) -> torch.Tensor:
    """Causal mask whose image queries see all text and earlier image tokens in a square window.

    Args:
        kernel: window side in tokens (odd); the original uses 11.
        hf_version: ``"v3"`` clips the window at the image borders, ``"v2"`` wraps it modulo ``n``.
    """
    if hf_version not in ("v2", "v3"):
        raise ValueError(f"hf_version must be 'v2' or 'v3', got {hf_version!r}")
    causal, both_image = _image_grid(text_tokens, image_tokens_per_dim)
    n, shift = image_tokens_per_dim, kernel // 2
    cell = (torch.arange(causal.shape[0], device=causal.device) - text_tokens).clamp(min=0)
    rows, cols = cell // n, cell % n
    d_row = (rows[:, None] - rows[None, :]).abs()  # (S, S)
    d_col = (cols[:, None] - cols[None, :]).abs()
    if hf_version == "v2":  # circular distance on the n x n torus
        d_row = torch.minimum(d_row, n - d_row)
        d_col = torch.minimum(d_col, n - d_col)
    in_window = (d_row <= shift) & (d_col <= shift)
    return causal & ~(both_image & ~in_window)


def layer_mask_kinds(num_layers: int) -> list[str]:
    """Which mask each layer uses: ``col`` if ``(i - 1) % 4 == 0``, else ``conv`` for the last
    layer, else ``row`` (the original checks ``col`` first)."""
    kinds = []
    for i in range(num_layers):
        if (i - 1) % 4 == 0:
            kinds.append("col")
        elif i == num_layers - 1:
            kinds.append("conv")
        else:
            kinds.append("row")
    return kinds


def build_masks(
    text_tokens: int, image_tokens_per_dim: int, *, kernel: int = 11, hf_version: str = "v3"
) -> dict[str, torch.Tensor]:
    """All three masks keyed ``row``, ``col``, ``conv``; each ``[S, S]`` bool."""
    return {
        "row": row_mask(text_tokens, image_tokens_per_dim),
        "col": col_mask(text_tokens, image_tokens_per_dim),
        "conv": conv_mask(text_tokens, image_tokens_per_dim, kernel=kernel, hf_version=hf_version),
    }
