"""The ruDALL-E generator: a sparse-attention GPT over ``[128 text ids | 32*32 image codes]``.

Read top to bottom: config, attention with a preallocated key/value cache, the sandwich-LayerNorm
block, the model (embeddings, layers, logits, the original loss), then conversion of the original
checkpoint layout and Hugging Face style save/load.

Layout of one sequence (``hf_version="v3"``)::

    position: 0 ........ 127 | 128 .............. 1151
    content : text ids (BPE) | image codes 0..8191 (row-major 32 x 32 grid)

``v2`` checkpoints (Malevich_v2, Emojich) prepend one extra BOS to the text, so everything sits one
position later and the last image code never enters the model; the masks still assume 128 text
positions. Both layouts are handled here by position arithmetic, never by branches in the layers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backend import SMALL_ROWS, linear, matmul, uses_numpy_blas  # noqa: F401 (torch, or the CPU decode backend
# when the generation loop selects it with backend.cpu_decoding; re-exported)
from .masks import build_masks, layer_mask_kinds

logger = logging.getLogger(__name__)

__all__ = ["DalleConfig", "DalleModel", "DalleOutput", "KVCache", "convert_rudalle_state_dict"]

FP16_MAX = 65504.0  # the original clamps attention outputs to the fp16 range


@dataclass(frozen=True)
class DalleConfig:
    """Architecture of a ruDALL-E generator. Defaults are Malevich (1.3B, v3)."""

    num_layers: int = 24  # transformer blocks
    hidden_size: int = 2048  # model width
    num_attention_heads: int = 16  # heads; hidden_size must divide evenly
    vocab_size: int = 16512  # text vocabulary: 16384 BPE ids + one pad id per text position
    image_vocab_size: int = 8192  # VQGAN codebook size
    text_seq_length: int = 128  # text positions (BOS ... EOS, right-padded)
    image_tokens_per_dim: int = 32  # image grid side in tokens: 32 x 32 = 1024 codes
    hf_version: str = "v3"  # "v3", or "v2" (extra leading BOS, wrapped conv mask)
    mlp_ratio: int = 4  # MLP width = mlp_ratio * hidden_size
    conv_kernel: int = 11  # window side of the conv mask (last layer)
    layernorm_epsilon: float = 1e-5  # eps of every LayerNorm
    dropout: float = 0.1  # embedding, attention and residual dropout (training only)
    loss_img_weight: float = 7.0  # loss = (L_text + w * L_image) / (w + 1)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "image_vocab_size", "text_seq_length", "image_tokens_per_dim", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DalleConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hf_version not in ("v2", "v3"):
            raise ValueError(f"hf_version must be 'v2' or 'v3', got {self.hf_version!r}")
        if self.text_seq_length >= self.vocab_size:
            raise ValueError("text_seq_length must be smaller than vocab_size (pad ids live at its end)")

    @property
    def image_seq_length(self) -> int:
        return self.image_tokens_per_dim**2

    @property
    def total_seq_length(self) -> int:
        """Positions the masks cover: text + image (1152 for the real models)."""
        return self.text_seq_length + self.image_seq_length

    @property
    def text_offset(self) -> int:
        """Position of the first image code: 128 in v3, 129 in v2 (extra BOS)."""
        return self.text_seq_length + (1 if self.hf_version == "v2" else 0)


@dataclass
class DalleOutput:
    """What :meth:`DalleModel.forward` returns.

    logits: ``[B, L, vocab_size + image_vocab_size]`` (or ``[B, L, image_vocab_size]`` with
        ``image_logits_only=True``), fp32 unless the model runs in another dtype.
    past_key_values: the cache after this call when ``use_cache=True``.
    loss, loss_text, loss_image: scalars with ``return_loss=True`` (the original's loss).
    """

    logits: torch.Tensor
    past_key_values: Optional["KVCache"] = None
    loss: Optional[torch.Tensor] = None
    loss_text: Optional[torch.Tensor] = None
    loss_image: Optional[torch.Tensor] = None


class KVCache:
    """Preallocated keys and values for every layer: ``[B, heads, total_seq_length, head_dim]``.

    Each forward writes its new positions in place and attends over ``[:length]``, so a generation
    step costs one position per layer, never the whole sequence. The buffers start as zeros: a
    fixed-shape step (:mod:`rudalle_pipe.static_decode`) attends over all positions with the unwritten
    ones masked, and a masked zero adds nothing where masked garbage could be NaN (``0 * NaN``).
    """

    def __init__(self, config: DalleConfig, batch_size: int, *, device, dtype) -> None:
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        shape = (batch_size, heads, config.total_seq_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0  # positions filled so far

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only batch rows ``index`` (for dropping or reordering candidates)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class SelfAttention(nn.Module):
    """Masked multi-head self-attention with a fused ``query_key_value`` projection."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """x: ``[B, T, C]`` for positions ``start .. start+T-1``; mask: ``[T, start+T]`` bool.

        With a cache and ``start`` a 0-dim device LongTensor (fixed shapes, for CUDA graphs), the new
        keys/values are written at ``start`` on the device and attention runs over all ``S`` cached
        positions: ``mask`` is then ``[T, S]`` and must hide every position not yet written."""
        B, T, C = x.shape
        qkv = self.query_key_value
        q, k, v = linear(x, qkv.weight, qkv.bias).split(C, dim=-1)  # each (B, T, C), contiguous thirds Q|K|V
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None and isinstance(start, torch.Tensor):  # fixed shapes: no host value decides a size
            cache_k, cache_v = cache
            where = start + torch.arange(T, device=start.device)
            cache_k.index_copy_(2, where, k)
            cache_v.index_copy_(2, where, v)
            k, v = cache_k, cache_v  # (B, nh, S, hd)
        elif cache is not None:  # write the new keys/values in place, attend over everything so far
            cache_k, cache_v = cache
            cache_k[:, :, start : start + T] = k
            cache_v[:, :, start : start + T] = v
            k, v = cache_k[:, :, : start + T], cache_v[:, :, : start + T]  # (B, nh, start+T, hd)
        if T <= 4 and not self.training:
            # decoding a few positions: plain matmuls beat the fused CPU kernel's fixed setup cost
            scores = matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))  # (B, nh, T, start+T)
            y = matmul(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1), v)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(linear(y, self.dense.weight, self.dense.bias).clamp(-FP16_MAX, FP16_MAX))


class MLP(nn.Module):
    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.mlp_ratio * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(config.mlp_ratio * config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.dense_h_to_4h, self.dense_4h_to_h
        return self.dropout(linear(F.gelu(linear(x, up.weight, up.bias), approximate="tanh"), down.weight, down.bias))


class Block(nn.Module):
    """Pre-LN block with CogView's "sandwich" LayerNorms before each residual addition."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = SelfAttention(config)
        self.before_first_addition_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config)
        self.before_second_addition_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, x, mask, cache=None, start: int | torch.Tensor = 0) -> torch.Tensor:
        x = x + self.before_first_addition_layernorm(
            self.attention(self.input_layernorm(x), mask, cache, start)
        )
        return x + self.before_second_addition_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """The blocks, the final LayerNorm, and the three ``[S, S]`` bool masks as buffers (built in
    code; stored copies in checkpoints are replaced at load time)."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        for kind, mask in _config_masks(config).items():
            self.register_buffer(f"{kind}_mask", mask)


def _config_masks(config: DalleConfig) -> dict[str, torch.Tensor]:
    return build_masks(config.text_seq_length, config.image_tokens_per_dim,
                       kernel=config.conv_kernel, hf_version=config.hf_version)


class DalleModel(nn.Module):
    """ruDALL-E generator. Build with a :class:`DalleConfig`; load weights with
    :func:`rudalle_pipe.get_rudalle_model` or :meth:`from_pretrained` (the constructor never loads).

    Call it on ``input_ids [B, L]`` (text ids, then image codes; ``L <= 1152``) to get logits
    ``[B, L, 24704]``: text vocabulary first, then the 8192 image codes.
    """

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.text_embeddings = nn.Embedding(config.vocab_size, h)
        self.image_embeddings = nn.Embedding(config.image_vocab_size, h)
        self.text_pos_embeddings = nn.Embedding(config.text_seq_length + 1, h)
        self.image_row_embeddings = nn.Embedding(config.image_tokens_per_dim, h)
        self.image_col_embeddings = nn.Embedding(config.image_tokens_per_dim, h)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.transformer = Transformer(config)
        self.to_logits = nn.Sequential(
            nn.LayerNorm(h, eps=config.layernorm_epsilon),
            nn.Linear(h, config.vocab_size + config.image_vocab_size),
        )
        self.mask_kinds = layer_mask_kinds(config.num_layers)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.text_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embeddings.weight.dtype

    def get_mask(self, kind: str) -> torch.Tensor:
        """The ``[S, S]`` bool attention mask ``kind`` ('row', 'col' or 'conv'), indexed [query, key]."""
        return getattr(self.transformer, f"{kind}_mask")

    def init_cache(self, batch_size: int) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences on the model's device and dtype."""
        return KVCache(self.config, batch_size, device=self.device, dtype=self.dtype)

    def _text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Replace pad id 0 at text position i by ``vocab_size - text_seq_length + i``; v2 also
        prepends a BOS. ``text [B, <=128]`` -> ``[B, <=129]``."""
        cfg = self.config
        pad_ids = torch.arange(text.shape[1], device=text.device) + (cfg.vocab_size - cfg.text_seq_length)
        text = torch.where(text == 0, pad_ids, text)
        if cfg.hf_version == "v2":
            text = F.pad(text, (1, 0), value=2)
        return text

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embed ``input_ids [B, T]`` that start at *input* index ``start`` (0 = first text id).

        Returns ``[B, T', C]`` where ``T' = T`` except in v2, where the text part gains a BOS and the
        sequence is cut to ``total_seq_length`` positions.
        """
        cfg = self.config
        T_text = cfg.text_seq_length
        parts = []
        if start < T_text:
            text = input_ids[:, : T_text - start]
            if start != 0:
                raise ValueError("text ids must be embedded in one call starting at position 0")
            text = self._text_ids(text)
            pos = torch.arange(text.shape[1], device=text.device)
            parts.append(self.text_embeddings(text) + self.text_pos_embeddings(pos))
        image = input_ids[:, max(T_text - start, 0) :]
        if image.shape[1]:
            first = max(start - T_text, 0)  # image index of the first code here
            p = torch.arange(first, first + image.shape[1], device=image.device)
            n = cfg.image_tokens_per_dim
            parts.append(
                self.image_embeddings(image)
                + self.image_row_embeddings(p // n)
                + self.image_col_embeddings(p % n)
            )
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        offset = start + (1 if cfg.hf_version == "v2" and start > 0 else 0)
        return x[:, : max(cfg.total_seq_length - offset, 0)]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        return_loss: bool = False,
        image_logits_only: bool = False,
        last_only: bool = False,
    ) -> DalleOutput:
        """Run the generator.

        Args:
            input_ids: ``[B, T]`` LongTensor. Without a cache: text ids (128) then image codes,
                ``T <= 1152``. With ``past_key_values`` holding ``n`` positions: the *next* ids only.
            past_key_values: a :class:`KVCache` from :meth:`init_cache` or a previous call.
            use_cache: fill and return a cache (a new one when ``past_key_values`` is None).
            return_loss: also compute the original's weighted text + image cross-entropy; needs the
                full ``[B, 1152]`` input.
            image_logits_only: return only the ``image_vocab_size`` image logits (cheaper).
            last_only: compute logits for the last position only (``[B, 1, V]``).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        cfg = self.config
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.init_cache(input_ids.shape[0])
        input_start = 0
        if cache is not None and cache.length:
            # positions already cached -> index of the next *input* id (v2 has one extra BOS position)
            input_start = cache.length - (1 if cfg.hf_version == "v2" else 0)
        if input_start + input_ids.shape[1] > cfg.total_seq_length:
            raise ValueError(
                f"sequence of {input_start + input_ids.shape[1]} ids exceeds the model's "
                f"{cfg.total_seq_length} positions ({cfg.text_seq_length} text + {cfg.image_seq_length} image)"
            )
        x = self.embed(input_ids, start=input_start)  # (B, T', C)
        if torch.is_grad_enabled():  # CogView's embedding-gradient shrink; the forward value is unchanged
            x = x * 0.1 + x.detach() * 0.9
        x = self.embed_dropout(x)

        start = cache.length if cache is not None else 0
        stop = start + x.shape[1]
        for i, layer in enumerate(self.transformer.layers):
            mask = self.get_mask(self.mask_kinds[i])[start:stop, :stop]  # (T', stop)
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            if self.gradient_checkpointing and self.training and kv is None:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask, kv, start)
        if cache is not None:
            cache.length = stop
        x = self.transformer.final_layernorm(x)
        if last_only:
            x = x[:, -1:]
        x = self.to_logits[0](x)
        head = self.to_logits[1]
        if image_logits_only:
            logits = linear(x, head.weight[cfg.vocab_size :], head.bias[cfg.vocab_size :])
        else:
            logits = linear(x, head.weight, head.bias)
        out = DalleOutput(logits=logits, past_key_values=cache if use_cache else None)
        if return_loss:
            if image_logits_only or last_only:
                raise ValueError("return_loss needs the full logits (image_logits_only=False, last_only=False)")
            out.loss, out.loss_text, out.loss_image = self.compute_loss(input_ids, logits)
        return out

    def compute_loss(self, input_ids: torch.Tensor, logits: torch.Tensor):
        """The original loss on a full ``[B, 1152]`` input and its logits ``[B, L, V]``.

        Labels are ``cat(text[1:], image)`` with pad ids replaced. Text logits at positions
        ``[:128]`` over the text vocabulary; image logits at ``128:-1`` (v3) or ``128:`` (v2) over the
        image vocabulary. Returns ``(loss, loss_text, loss_image)`` with
        ``loss = (loss_text + w * loss_image) / (w + 1)``.
        """
        cfg = self.config
        T = cfg.text_seq_length
        if input_ids.shape[1] != cfg.total_seq_length:
            raise ValueError(f"the loss needs the full sequence of {cfg.total_seq_length} ids, got {input_ids.shape[1]}")
        text = self._text_ids(input_ids[:, :T])
        labels = torch.cat((text[:, 1:], input_ids[:, T:]), dim=1)
        logits = logits.float()
        text_logits = logits[:, :T, : cfg.vocab_size]
        image_logits = logits[:, T : (None if cfg.hf_version == "v2" else -1), cfg.vocab_size :]
        loss_text = F.cross_entropy(text_logits.reshape(-1, cfg.vocab_size), labels[:, :T].reshape(-1))
        loss_image = F.cross_entropy(
            image_logits.reshape(-1, cfg.image_vocab_size), labels[:, T:].reshape(-1)
        )
        w = cfg.loss_img_weight
        return (loss_text + w * loss_image) / (w + 1), loss_text, loss_image

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
        """Write ``config.json`` and ``model.safetensors`` (sharded with an index above
        ``max_shard_size``) in the Hugging Face layout, atomically (see
        :func:`rudalle_pipe.hub.save_pretrained`). Refuses a folder that exists and is not empty."""
        from .hub import save_pretrained

        save_pretrained(self, self.config, save_directory, model_type="rudalle", max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    commit_message: str = "Upload ruDALL-E generator") -> str:
        """Save to a temporary folder in the Hugging Face layout and upload it to ``repo_id``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(info)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device="cpu", dtype=torch.float32,
                        sandbox: str | os.PathLike | None = None, **config_overrides) -> "DalleModel":
        """Load a model saved by :meth:`save_pretrained` from a local directory, on the meta device
        first so the weights are materialised once. Only ``.safetensors`` files inside the folder (or
        inside ``sandbox``, see :func:`rudalle_pipe.hub.load_pretrained`) are read; NaN/inf weights are
        refused by name."""
        from .hub import load_pretrained

        return load_pretrained(cls, DalleConfig, directory, model_type="rudalle", device=device, dtype=dtype,
                               sandbox=sandbox, **config_overrides)


def convert_rudalle_state_dict(raw: dict[str, torch.Tensor], config: DalleConfig) -> dict[str, torch.Tensor]:
    """Original ``DalleModel`` state dict -> this module's layout.

    Weight names are the same. Mask buffers may be stored under ``transformer.`` (bool, v3 files),
    at top level (fp16, older files) or not at all; they are always replaced by the masks built from
    ``config``, with a warning when a stored copy differs (a sign of the wrong ``hf_version``). Other
    keys are kept, so that unexpected ones are reported by the key check.
    """
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"expected a state dict (mapping of names to tensors), got {type(raw).__name__}")
    built = _config_masks(config)
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        kind = key.removeprefix("transformer.").removesuffix("_mask")
        if key in (f"{kind}_mask", f"transformer.{kind}_mask") and kind in built:
            if isinstance(value, torch.Tensor) and value.shape == built[kind].shape \
                    and not torch.equal(value.bool(), built[kind]):
                logger.warning("stored %s differs from the %s mask built for hf_version=%r; using the built one",
                               key, kind, config.hf_version)
            continue
        out[key] = value
    out.update({f"transformer.{kind}_mask": mask for kind, mask in built.items()})
    return out
