"""Tiny random components shared by the tests (fast on a 2-core CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rudalle_pipe import DalleConfig, DalleModel
from rudalle_pipe.pipeline import Pipeline
from rudalle_pipe.vae import VQGAN, VQGANConfig

TEXT_LEN, SIDE, IMAGE_VOCAB = 8, 4, 50  # 8 text positions, a 4x4 grid of codes, 50 codes

TINY_CLIP_NAME = "rudalle-pipe-tiny-clip"
TINY_CLIP_CFG = {  # a tiny ViT and the standard open_clip text transformer (its own BPE vocabulary)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_dalle(version: str = "v3", seed: int = 0) -> DalleModel:
    torch.manual_seed(seed)
    config = DalleConfig(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=300,
                         image_vocab_size=IMAGE_VOCAB, text_seq_length=TEXT_LEN, image_tokens_per_dim=SIDE,
                         hf_version=version)
    return DalleModel(config).eval()


def tiny_vae(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    config = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                         embed_dim=32, n_embed=IMAGE_VOCAB, resolution=SIDE * 8)
    return VQGAN(config).eval()


def register_tiny_clip(directory: Path) -> str:
    """Make open_clip know the tiny CLIP architecture by name (a config file, like its built-ins)."""
    import open_clip

    path = Path(directory) / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def tiny_upscaler(seed: int = 0, scale: int = 4):
    from rudalle_pipe.realesrgan import RRDBNet, RRDBNetConfig

    torch.manual_seed(seed)
    return RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4, scale=scale)).eval()


def tiny_pipeline(fixtures_dir: Path, tmp_dir: Path, *, clip: bool = True, upscaler: bool = True) -> Pipeline:
    """A whole random pipeline: fixture tokenizer, tiny generator, VQGAN, CLIP and x4 upscaler."""
    from rudalle_pipe.tokenizer import YTTMTokenizer

    pipe = Pipeline(tokenizer=YTTMTokenizer.from_file(Path(fixtures_dir) / "tokenizer" / "bpe.model"),
                    dalle=tiny_dalle(), vae=tiny_vae(), name="tiny")
    if clip:
        from rudalle_pipe.clip import get_clip

        torch.manual_seed(0)
        pipe.clip = get_clip(register_tiny_clip(tmp_dir), None)
    if upscaler:
        pipe.upscaler = tiny_upscaler()
    return pipe
