"""The sparse attention masks equal the original's, bit for bit."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from rudalle_pipe.masks import build_masks, col_mask, conv_mask, layer_mask_kinds, row_mask

SMALL = [(6, 4), (8, 6), (5, 13)]


@pytest.mark.parametrize("text_tokens,n", SMALL)
def test_small_masks_equal_original(fixtures_dir, text_tokens, n):
    ref = load_file(fixtures_dir / "masks" / "small_masks.safetensors")
    ours = {
        "row": row_mask(text_tokens, n),
        "col": col_mask(text_tokens, n),
        "conv_v2": conv_mask(text_tokens, n, hf_version="v2"),
        "conv_v3": conv_mask(text_tokens, n, hf_version="v3"),
    }
    for kind, mask in ours.items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, ref[f"{kind}_t{text_tokens}_n{n}"].bool()), kind


def test_full_size_masks_match_sha256(fixtures_dir):
    ref = json.loads((fixtures_dir / "masks" / "full_masks.json").read_text())
    for version in ("v2", "v3"):
        masks = build_masks(128, 32, hf_version=version)
        ours = {"row": masks["row"], "col": masks["col"], f"conv_{version}": masks["conv"]}
        for kind, mask in ours.items():
            assert mask.shape == (1152, 1152)
            assert int(mask.sum()) == ref["true_count"][kind], kind
            digest = hashlib.sha256(mask.to(torch.uint8).numpy().tobytes()).hexdigest()
            assert digest == ref["sha256"][kind], kind


def test_masks_are_causal_and_text_sees_text():
    for mask in build_masks(5, 4).values():
        assert not mask.triu(1).any()  # nothing attends to the future
        assert mask[:5, :5].equal(torch.ones(5, 5, dtype=torch.bool).tril())
        assert mask[5:, :5].all()  # image queries see every text token


def test_layer_mask_kinds_follow_original_rule():
    malevich = layer_mask_kinds(24)
    assert [i for i, k in enumerate(malevich) if k == "col"] == [1, 5, 9, 13, 17, 21]
    assert malevich[23] == "conv" and malevich.count("conv") == 1
    assert layer_mask_kinds(6)[-1] == "col"  # col is checked before conv
    assert layer_mask_kinds(4) == ["row", "col", "row", "conv"]


def test_conv_mask_rejects_unknown_version():
    with pytest.raises(ValueError, match="'v2' or 'v3'.*'v4'"):
        conv_mask(4, 4, hf_version="v4")
