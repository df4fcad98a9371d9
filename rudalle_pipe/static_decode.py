"""A decoding step at fixed shapes, and its capture in a CUDA graph.

The plain cached step (:meth:`DalleModel.forward` with a :class:`~rudalle_pipe.dalle.KVCache`) attends over
``[:length]`` keys, so every step has new shapes and the host launches some 300 kernels one by one. On a GPU
that launch work, not the arithmetic, bounds a step of a 1.3B model at small batch. Here the step keeps
every shape fixed: the position is a 0-dim device tensor, the new key/value goes into the cache with
``index_copy_`` at that position, and attention runs over all ``S`` cached positions with the layer's mask
row for that position (unwritten positions are masked, and the cache starts as zeros); without a graph
(CPU) attention spans the filled part rounded up to a multiple of ``BUCKET``: a handful of shapes. Nothing
in the step reads a value back to the host, so on CUDA the whole step is captured once in a ``torch.cuda.CUDAGraph``
and replayed: one launch per token.

Choose it with ``generate_images(..., decoder="static")``; ``"auto"`` picks it on CUDA, and on CPU for
bf16/fp16 models, where few shapes spare oneDNN building a new kernel at every step. In fp32 on CPU it
is no faster than the dynamic step.

Without a graph, the first ``span`` positions of a ``[R, heads, S, head_dim]`` cache are not contiguous, and
PyTorch's bf16/fp16 CPU matmul copies such a slice before every product: at Malevich shape and batch 8 those
copies cost more than the weights' products (up to 26 ms per layer at a span of 1024). The step therefore
attends over contiguous working copies of the span, made once per bucket, and writes each new key/value into
both them and the cache (``benchmarks/scale.py`` measures the step). The copies take at most the cache's memory
again.
"""
from __future__ import annotations

import logging

import torch

from .backend import linear
from .dalle import DalleModel, KVCache

logger = logging.getLogger(__name__)

__all__ = ["DECODERS", "StaticDecoder", "bucket_span", "resolve_decoder"]

DECODERS = ("auto", "dynamic", "static")
BUCKET = 128  # without a graph, attention spans the filled cache rounded up to a multiple of this


def resolve_decoder(decoder: str, device: torch.device, use_cache: bool, dtype: torch.dtype = torch.float32) -> str:
    """``"auto"`` -> ``"static"`` with a cache on CUDA or in a dtype other than fp32, else ``"dynamic"``;
    other names are checked. (On CPU, bf16/fp16 products of a new shape build a new oneDNN kernel
    first: attention over a growing cache did that at every step, 2 ms steps took up to 200 ms.)

    Raises:
        ValueError: an unknown name, or ``"static"`` without a cache (the fixed-shape step *is* a cached step).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
    if decoder == "auto":
        return "static" if use_cache and (device.type == "cuda" or dtype != torch.float32) else "dynamic"
    if decoder == "static" and not use_cache:
        raise ValueError("decoder='static' is a cached step: it needs use_cache=True")
    return decoder


def bucket_span(filled: int, total: int) -> int:
    """Positions attended over without a graph: ``filled`` rounded up to a multiple of ``BUCKET``, at most
    ``total``."""
    return min(total, -(-filled // BUCKET) * BUCKET)


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
        self._work: list[tuple[torch.Tensor, torch.Tensor]] = []  # contiguous copies of the span (see the module)
        self._work_key: tuple | None = None  # what they copy: (span, cache length, the cache's tensors)

    def _span(self) -> int:
        """Cache positions the step attends over: all ``S`` in a graph; else the filled ones rounded up to a
        multiple of ``BUCKET``, so that only ``S / BUCKET`` shapes ever occur."""
        S = self.dalle.config.total_seq_length
        return S if self.graph else bucket_span(self.cache.length + 1, S)

    def _step(self) -> torch.Tensor:
        """The step on the static inputs: ``self.token [R, 1]`` at ``self.position``. Returns ``[R, V_img]``."""
        dalle, cfg, pos = self.dalle, self.dalle.config, self.position
        index = (pos - cfg.text_offset).view(1)  # image index of the token: (1,)
        n = cfg.image_tokens_per_dim
        x = (dalle.image_embeddings(self.token) + dalle.image_row_embeddings(index // n)
             + dalle.image_col_embeddings(index % n))  # (R, 1, C)
        span = self._span()
        spans = self._spans(span)
        for layer, mask, kv in zip(dalle.transformer.layers, self._masks, spans):
            row = mask.index_select(0, pos.view(1))[:, :span]  # (1, span)
            x = layer(x, row, kv, pos)
        if spans is self._work:  # the layers wrote the new key/value into the copies: the cache gets them too
            for (k, v), cache_k, cache_v in zip(spans, self.cache.keys, self.cache.values):
                cache_k.index_copy_(2, pos.view(1), k.index_select(2, pos.view(1)))
                cache_v.index_copy_(2, pos.view(1), v.index_select(2, pos.view(1)))
        x = dalle.to_logits[0](dalle.transformer.final_layernorm(x))
        return linear(x[:, 0], *self._head)

    def _spans(self, span: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values ``[R, heads, span, head_dim]`` the step attends over: views of the cache
        in a graph, off the CPU, in fp32 or where they are contiguous; else (bf16/fp16 on the CPU) the working
        copies, remade whenever the span, the cache's length (it was not this step that moved it) or the cache's
        tensors changed."""
        cache = self.cache
        k0 = cache.keys[0]
        if self.graph or k0.device.type != "cpu" or k0.dtype == torch.float32 or span == k0.shape[2] \
                or k0.shape[0] * k0.shape[1] == 1:  # a graph, or products that read strided slices without a copy
            self._work, self._work_key = [], None
            return [(k[:, :, :span], v[:, :, :span]) for k, v in zip(cache.keys, cache.values)]
        tensors = (*cache.keys, *cache.values)  # held, so that a replaced cache can never share an identity
        if self._work_key is None or self._work_key[:2] != (span, cache.length) \
                or any(a is not b for a, b in zip(self._work_key[2], tensors)):
            self._work = []  # the old copies go before the new ones are made
            self._work = [(k[:, :, :span].contiguous(), v[:, :, :span].contiguous())
                          for k, v in zip(cache.keys, cache.values)]
        self._work_key = (span, cache.length + 1, tensors)  # what the cache will look like after this step
        return self._work

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
