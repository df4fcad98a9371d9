"""Weight-only int8 for generation: each large linear layer keeps int8 weights and one fp32 scale per
output channel, and the products accumulate in floating point.

A batch-1 decoding step reads every weight once, so on a CPU its time is the bytes of weight over the
memory bandwidth: int8 reads a quarter of fp32's bytes (half of bf16's). The product runs through
PyTorch's own int8-weight kernel (``torch._weight_int8pack_mm``, CPU, PyTorch 2.3 and newer) with the
activations in bf16; where that kernel is missing (older PyTorch, other devices) the weights are
dequantized for each product instead, which is correct but not faster.

Use it after loading, on the device you generate on::

    dalle = quantize_int8(get_rudalle_model("Malevich"))      # 5.2 GB of fp32 weights -> 1.5 GB

Embeddings, LayerNorms and the key/value cache stay in the model's dtype. A quantized model is for
generation only: training it, or saving it with ``save_pretrained``, is refused.
"""
from __future__ import annotations

import logging
from torch import nn

from .backend import Int8Weight, quantize_weight
from .dalle import DalleModel

logger = logging.getLogger(__name__)

__all__ = ["Int8Weight", "Int8Linear", "quantize_int8", "quantize_weight", "is_quantized"]

class Int8Linear(nn.Module):
    """Stands in for an ``nn.Linear`` whose ``.weight`` is read by the model code: ``.weight`` is an
    :class:`Int8Weight` built on the module's buffers (so ``.to(device)`` moves them)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        quantized = quantize_weight(linear.weight)
        self.register_buffer("weight_int8", quantized.q)
        self.register_buffer("weight_scales", quantized.scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> Int8Weight:
        return Int8Weight(self.weight_int8, self.weight_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds int8 weights."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_int8(dalle: DalleModel, *, min_features: int = 1) -> DalleModel:
    """Replace every linear layer of the transformer blocks and the output head by an
    :class:`Int8Linear`, in place, and return ``dalle`` (eval mode, gradients off).

    Args:
        dalle: a loaded generator, already on the device it will generate on.
        min_features: skip layers with fewer input features than this.

    Raises:
        ValueError: ``dalle`` is already quantized, or is in training mode.
    """
    if is_quantized(dalle):
        raise ValueError("the model is already quantized")
    if dalle.training:
        raise ValueError("quantize_int8 is for generation: call dalle.eval() first (a quantized model cannot train)")
    count, before, after = 0, 0, 0
    for parent in list(dalle.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features >= min_features:
                replacement = Int8Linear(child)
                before += child.weight.numel() * child.weight.element_size()
                after += replacement.weight_int8.numel() + replacement.weight_scales.numel() * 4
                setattr(parent, name, replacement)
                count += 1
    dalle.requires_grad_(False)
    dalle.quantization = "int8"
    logger.info("quantized %d linear layers to int8: %.1f MB -> %.1f MB", count, before / 1e6, after / 1e6)
    return dalle
