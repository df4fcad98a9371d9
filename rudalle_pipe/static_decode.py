"""A decoding step at fixed shapes, and its capture in a CUDA graph.

The plain cached step (:meth:`DalleModel.forward` with a :class:`~rudalle_pipe.dalle.KVCache`) attends over
``[:length]`` keys, so every step has new shapes and the host launches some 300 kernels one by one. On a GPU
that launch work, not the arithmetic, bounds a step of a 1.3B model at small batch. Here the step keeps
every shape fixed: the position is a 0-dim device tensor, the new key/value goes into the cache with
``index_copy_`` at that position, and attention runs over all ``S`` cached positions with the layer's mask
row for that position (unwritten positions are masked, and the cache starts as zeros). Nothing in the step
reads a value back to the host, so on CUDA the whole step is captured once in a ``torch.cuda.CUDAGraph``
and replayed: one launch per token.

Choose it with ``generate_images(..., decoder="static")`` (``"auto"`` picks it on CUDA). On CPU it runs the
same fixed-shape step eagerly; there it is only slower (attention over all positions), and exists so that
the parity tests cover the code the GPU runs.
"""
from __future__ import annotations

import logging

import torch

from .dalle import DalleModel, KVCache

logger = logging.getLogger(__name__)

__all__ = ["DECODERS", "StaticDecoder", "resolve_decoder"]

DECODERS = ("auto", "dynamic", "static")


def resolve_decoder(decoder: str, device: torch.device, use_cache: bool) -> str:
    """``"auto"`` -> ``"static"`` on CUDA with a cache, else ``"dynamic"``; other names are checked.

    Raises:
        ValueError: an unknown name, or ``"static"`` without a cache (the fixed-shape step *is* a cached step).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
    if decoder == "auto":
        return "static" if use_cache and device.type == "cuda" else "dynamic"
    if decoder == "static" and not use_cache:
        raise ValueError("decoder='static' is a cached step: it needs use_cache=True")
    return decoder


class StaticDecoder:
    """One image position for every row of ``cache``, at fixed shapes.

    Args:
        dalle: the generator (eval mode, any device and dtype).
        cache: a :class:`KVCache` already holding the text prefix (``cache.length >= text_offset``).
        graph: capture the step in a CUDA graph on its first call (CUDA only; default: on CUDA).

    Call it with ``token [R]`` (the image code at cache position ``cache.length``) to get the image
    logits ``[R, image_vocab_size]`` of the next position; ``cache.length`` advances by one. With a
    graph, the returned tensor is a static buffer that the next call overwrites.
    """

    def __init__(self, dalle: DalleModel, cache: KVCache, *, graph: bool | None = None) -> None:
        self.dalle, self.cache = dalle, cache
        device = dalle.device
        self.graph = device.type == "cuda" if graph is None else bool(graph)
        if self.graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA model, got device {device}")
        rows = cache.keys[0].shape[0]
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)  # static inputs of the step
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        cfg = dalle.config
        self._masks = [dalle.get_mask(kind) for kind in dalle.mask_kinds]  # [S, S] each
        self._head = (dalle.to_logits[1].weight[cfg.vocab_size:], dalle.to_logits[1].bias[cfg.vocab_size:])

    def _step(self) -> torch.Tensor:
        """The step on the static inputs: ``self.token [R, 1]`` at ``self.position``. Returns ``[R, V_img]``."""
        dalle, cfg, pos = self.dalle, self.dalle.config, self.position
        index = (pos - cfg.text_offset).view(1)  # image index of the token: (1,)
        n = cfg.image_tokens_per_dim
        x = (dalle.image_embeddings(self.token) + dalle.image_row_embeddings(index // n)
             + dalle.image_col_embeddings(index % n))  # (R, 1, C)
        for layer, mask, k, v in zip(dalle.transformer.layers, self._masks, self.cache.keys, self.cache.values):
            x = layer(x, mask.index_select(0, pos.view(1)), (k, v), pos)  # mask row (1, S)
        x = dalle.to_logits[0](dalle.transformer.final_layernorm(x))
        return torch.nn.functional.linear(x[:, 0], *self._head)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.length >= self.dalle.config.total_seq_length:
            raise ValueError(f"the cache is full ({cache.length} positions)")
        self.token.copy_(token.reshape(-1, 1))
        self.position.fill_(cache.length)
        if not self.graph:
            logits = self._step()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self.logits
        cache.length += 1
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream, then capture. Warm-up and capture run on the real inputs of the
        first step, so the key/value they write are the ones the replay writes again."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._step()
        logger.debug("captured a decoding step for %d rows in a CUDA graph", self.token.shape[0])
