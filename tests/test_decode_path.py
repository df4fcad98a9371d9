"""An independent check of the CPU decoding path (rudalle_pipe.backend, re-exported by dalle.py).

While the generation loop selects the CPU backend (``backend.cpu_decoding``), fp32 products of at most
``SMALL_ROWS`` rows go through numpy's BLAS (one row: sgemv; 2-4 rows with a large weight: blocked sgemv;
more: sgemm), and every other test of a generation runs that same path on both sides of its comparison. Here the reference is always torch's
own ``F.linear`` in float64, and the tests first prove that the numpy path really ran (torch's
``F.linear`` is replaced inside backend by one that fails on the rows decoding uses).
"""
from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rudalle_pipe import DalleConfig, DalleModel, backend, dalle

DECODING_ROWS = (1, 2, 3, 4, 8, 64)  # batch x 1 position: one image, a guidance pair, ..., SMALL_ROWS
CPU_FP32 = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)  # what cpu_decoding reads of a model


def _record_torch_linear(monkeypatch) -> list[int]:
    """Make backend's ``F.linear`` record the row count of each product it computes; return the list."""
    calls: list[int] = []

    def linear(x, weight, bias=None):
        calls.append(x.numel() // x.shape[-1])
        return F.linear(x, weight, bias)

    monkeypatch.setattr(backend, "F", SimpleNamespace(linear=linear))
    return calls


def _record_few_rows(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = backend._few_rows
    monkeypatch.setattr(backend, "_few_rows", lambda w, x: calls.append(x.shape[0]) or original(w, x))
    return calls


@pytest.mark.parametrize("rows", DECODING_ROWS)
@pytest.mark.parametrize("shape", [(576, 192), (1536, 1024)], ids=["demo-qkv", "large"])
def test_numpy_linear_equals_torch_at_decoding_row_counts(rows, shape, monkeypatch):
    """dalle.linear (the name the generator calls) against F.linear in float64, on the [batch, 1, in]
    inputs of a decoding step; the large weight takes the blocked path for 2-4 rows."""
    assert dalle.linear is backend.linear
    torch_calls, blocked = _record_torch_linear(monkeypatch), _record_few_rows(monkeypatch)
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    bias, x = torch.randn(shape[0], generator=gen), torch.randn(rows, 1, shape[1], generator=gen)
    with torch.inference_mode(), backend.cpu_decoding(CPU_FP32, rows):
        got = dalle.linear(x, weight, bias)
    assert torch_calls == [], "the numpy path was not taken"
    large = weight.numel() >= backend._PAIR_MIN_WEIGHT
    assert blocked == ([rows] if large and 2 <= rows <= backend.PAIR_ROWS else [])
    want = F.linear(x.double(), weight.double(), bias.double())
    assert got.shape == want.shape == (rows, 1, shape[0]) and got.dtype == torch.float32
    error = (got.double() - want).abs().max().item()
    assert error < 1e-4, error  # fp32 rounding of a 1024-term dot product of unit-scale terms: ~1e-6
    assert not torch.equal(got.double(), want)  # fp32 against fp64: a copy of the reference would be exact


def test_numpy_linear_without_bias_and_with_strided_input(monkeypatch):
    torch_calls = _record_torch_linear(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(300, 64, generator=gen)
    x = torch.randn(3, 1, 128, generator=gen)[..., ::2]  # a non-contiguous view
    with torch.inference_mode(), backend.cpu_decoding(CPU_FP32, 3):
        got = dalle.linear(x, weight)
    assert torch_calls == []
    assert torch.allclose(got.double(), F.linear(x.double(), weight.double()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["65 rows", "autograd", "float64", "not selected"])
def test_products_outside_decoding_stay_on_torch(case, monkeypatch):
    torch_calls = _record_torch_linear(monkeypatch)
    rows = backend.SMALL_ROWS + 1 if case == "65 rows" else 4
    dtype = torch.float64 if case == "float64" else torch.float32
    x, weight = torch.randn(rows, 1, 32, dtype=dtype), torch.randn(16, 32, dtype=dtype)
    selected = backend.cpu_decoding(CPU_FP32, 4) if case != "not selected" else nullcontext()
    with torch.enable_grad() if case == "autograd" else torch.inference_mode(), selected:
        out = dalle.linear(x, weight)
    assert torch_calls == [rows] and torch.allclose(out, F.linear(x, weight))


@pytest.mark.parametrize("batch", DECODING_ROWS)
def test_cached_decoding_on_the_numpy_path_equals_a_float64_torch_forward(batch, monkeypatch):
    """A generator wide enough for the blocked path (MLP weights of 1M elements) decodes image positions
    one by one through its key/value cache in fp32; each step's image logits equal the float64 forward
    of the whole sequence without a cache, which never touches numpy."""
    torch.manual_seed(batch)
    config = DalleConfig(num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=200,
                         image_vocab_size=64, text_seq_length=6, image_tokens_per_dim=4)
    model = DalleModel(config).eval()
    reference = DalleModel(config).double().eval()
    reference.load_state_dict(model.state_dict())
    steps = 3
    ids = torch.cat([torch.randint(4, 150, (batch, config.text_seq_length)),
                     torch.randint(0, config.image_vocab_size, (batch, steps))], dim=1)
    with torch.inference_mode():
        want = reference(ids, image_logits_only=True).logits[:, config.text_seq_length - 1:-1]  # (B, steps, V)
        out = model(ids[:, :config.text_seq_length], use_cache=True, image_logits_only=True, last_only=True)
        got = [out.logits[:, -1]]
        torch_calls, blocked = _record_torch_linear(monkeypatch), _record_few_rows(monkeypatch)
        with backend.cpu_decoding(model, batch):  # as sample_codes selects it
            for t in range(steps - 1):
                position = config.text_seq_length + t
                out = model(ids[:, position:position + 1], past_key_values=out.past_key_values, use_cache=True,
                            image_logits_only=True)
                got.append(out.logits[:, -1])
    assert torch_calls == [], "a decoding step went through torch's F.linear"
    # per step and layer the two MLP products have >= 1M weight elements: blocked for 2-4 rows
    assert blocked == ([batch] * 2 * config.num_layers * (steps - 1) if 2 <= batch <= 4 else [])
    got = torch.stack(got, dim=1).double()
    assert got.shape == want.shape == (batch, steps, config.image_vocab_size)
    assert (got - want).abs().max().item() < 1e-4
