"""rudalle_pipe.ranking: rerank by CLIP, by perplexity (the original's order) and combined; offline, tiny CLIP."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rudalle_pipe import RerankOutput, cherry_pick_by_clip, rerank
from rudalle_pipe.ranking import combine_scores
from tiny import register_tiny_clip

TEXT = "красный квадрат"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from rudalle_pipe.clip import get_clip

    torch.manual_seed(0)
    return get_clip(register_tiny_clip(tmp_path_factory.mktemp("clip")), None)


def noise(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def z(values):
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    return np.zeros_like(values) if std == 0 else (values - values.mean()) / std


def test_perplexity_reproduces_the_original_order_without_clip():
    images = noise(6)
    ppl = [3.5, 1.25, 7.0, 1.25, 2.0, 3.5]  # ties: stable, input order kept
    out = rerank(images, TEXT, perplexities=ppl, by="perplexity")
    assert isinstance(out, RerankOutput) and out.by == "perplexity"
    assert out.indices == sorted(range(6), key=lambda i: ppl[i]) == [1, 3, 4, 0, 5, 2]
    assert out.scores == sorted(ppl) == out.perplexities
    assert all(out.images[k] is images[i] for k, i in enumerate(out.indices))
    assert out.clip_scores is None and out.combined is None and out.weight is None
    top = cherry_pick_by_clip(images, TEXT, None, by="perplexity", perplexities=torch.tensor(ppl), top_n=2)
    assert top.indices == [1, 3] and top.scores == [1.25, 1.25]


def test_clip_order_carries_every_score(clip):
    images = noise(7, seed=1)
    ppl = [float(p) for p in np.random.default_rng(2).uniform(1.5, 40.0, 7)]
    plain = cherry_pick_by_clip(images, TEXT, clip, progress=False)  # no perplexities: as before
    assert plain.by == "clip" and plain.scores == plain.clip_scores and plain.perplexities is None
    assert plain.combined is None and plain.scores == sorted(plain.scores, reverse=True)
    out = rerank(images, TEXT, clip=clip, perplexities=ppl, progress=False)
    assert out.indices == plain.indices and out.scores == pytest.approx(plain.scores, abs=1e-6)
    assert out.perplexities == [ppl[i] for i in out.indices]  # every list in ranked order
    clip_by_input = dict(zip(out.indices, out.clip_scores))
    expected = 0.5 * z([clip_by_input[i] for i in range(7)]) + 0.5 * z([-math.log(p) for p in ppl])
    assert out.combined == pytest.approx(expected[out.indices].tolist(), abs=1e-9) and out.weight == 0.5


def test_combined_endpoints_and_middle(clip):
    images = noise(8, seed=3)
    ppl = [float(p) for p in np.random.default_rng(4).uniform(1.5, 40.0, 8)]
    by_clip = rerank(images, TEXT, clip=clip, progress=False).indices
    by_ppl = rerank(images, TEXT, perplexities=ppl, by="perplexity").indices
    assert by_clip != by_ppl  # otherwise the endpoints would prove nothing
    one = rerank(images, TEXT, clip=clip, perplexities=ppl, by="combined", weight=1.0, progress=False)
    zero = rerank(images, TEXT, clip=clip, perplexities=ppl, by="combined", weight=0, progress=False)
    assert one.indices == by_clip and zero.indices == by_ppl
    assert one.scores == one.combined and zero.weight == 0.0
    half = rerank(images, TEXT, clip=clip, perplexities=ppl, by="combined", progress=False)
    assert half.scores == sorted(half.scores, reverse=True) and half.weight == 0.5
    clip_by_input = dict(zip(one.indices, one.clip_scores))
    expected = 0.5 * z([clip_by_input[i] for i in range(8)]) + 0.5 * z(-np.log(ppl))
    assert half.indices == sorted(range(8), key=lambda i: -expected[i])


def test_combine_scores_by_hand_and_all_equal_sets():
    clip, ppl = [0.9, 0.1, 0.5], [10.0, 1.0, 2.0]
    zc = [(0.9 - 0.5) / math.sqrt(0.32 / 3), (0.1 - 0.5) / math.sqrt(0.32 / 3), 0.0]
    assert combine_scores(clip, ppl, 1.0) == pytest.approx(zc)
    got = combine_scores(clip, ppl, 0.25)
    assert got == pytest.approx((0.25 * np.array(zc) + 0.75 * z(-np.log(ppl))).tolist())
    assert combine_scores(clip, [4.0, 4.0, 4.0], 0.3) == pytest.approx([0.3 * v for v in zc])  # ppl carry no signal
    assert combine_scores([0.2, 0.2, 0.2], ppl, 0.7) == pytest.approx((0.3 * z(-np.log(ppl))).tolist())
    assert combine_scores([0.2], [3.0], 0.5) == [0.0]  # one candidate: nothing to normalise against


def test_equal_clip_scores_fall_back_to_perplexity_order(clip):
    a = noise(1, seed=5)[0]
    images = [a, a.copy(), a.copy(), a.copy()]
    ppl = [4.0, 2.0, 9.0, 3.0]
    out = rerank(images, TEXT, clip=clip, perplexities=ppl, by="combined", weight=0.9, batch_size=1, progress=False)
    assert len(set(out.clip_scores)) == 1 and out.indices == [1, 3, 0, 2]


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"by": "ppl"}, ValueError, "by must be one of 'clip', 'perplexity', 'combined', got 'ppl'"),
    ({"by": None}, ValueError, "by must be one of"),
    ({"clip": None}, ValueError, r"by='clip' needs clip="),
    ({"clip": None, "perplexities": [1.0] * 3, "by": "combined"}, ValueError, r"by='combined' needs clip="),
    ({"by": "perplexity", "clip": None}, ValueError, r"by='perplexity' needs perplexities="),
    ({"by": "combined"}, ValueError, r"by='combined' needs perplexities="),
    ({"perplexities": [1.0, 2.0]}, ValueError, "perplexities has 2 values but there are 3 images"),
    ({"perplexities": [1.0, float("nan"), 2.0]}, ValueError, r"perplexities\[1\] must be a finite number > 0, got nan"),
    ({"perplexities": [1.0, 2.0, float("inf")]}, ValueError, r"perplexities\[2\] must be a finite number"),
    ({"perplexities": [1.0, 0.0, 2.0]}, ValueError, r"perplexities\[1\] must be a finite number > 0, got 0.0"),
    ({"perplexities": [1.0, -2.0, 2.0]}, ValueError, r"perplexities\[1\] must be a finite number > 0"),
    ({"perplexities": [1.0, "2", 2.0]}, TypeError, r"perplexities\[1\] must be a finite number"),
    ({"perplexities": 3.0}, TypeError, "perplexities must be a list of 3 numbers"),
    ({"perplexities": torch.ones(3, 1)}, ValueError, "perplexities must be 1-D"),
    ({"perplexities": [1.0] * 3, "weight": 1.5}, ValueError, r"weight must be a finite number in \[0, 1\], got 1.5"),
    ({"weight": 0.5}, ValueError, "weight=0.5 sets CLIP's share of the combined score, which needs both"),
    ({"clip": None, "by": "perplexity", "perplexities": [1.0] * 3, "templates": ["фото {}"]}, ValueError,
     "templates only shape the CLIP text embedding"),
    ({"clip": "ViT-B-32"}, TypeError, "clip must be a ClipBundle"),
    ({"top_n": 4}, ValueError, r"top_n=4 .*number of images \(3\)"),
])
def test_bad_inputs_fail_before_any_work(clip, monkeypatch, kwargs, error, pattern):
    import rudalle_pipe.ranking as ranking

    def no_clip(*args, **kw):
        raise AssertionError("CLIP ran before the arguments were checked")

    monkeypatch.setattr(ranking, "clip_scores", no_clip)
    args = {"clip": clip} | kwargs
    with pytest.raises(error, match=pattern):
        rerank(noise(3), TEXT, progress=False, **args)
