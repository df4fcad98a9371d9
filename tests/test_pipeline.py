"""Pipeline directories: save_pipeline / load_pipeline round trip and errors."""
import pytest
import torch

from rudalle_pipe import list_pipelines, load_pipeline, save_pipeline
from tiny import tiny_pipeline


def test_round_trip_keeps_every_weight(fixtures_dir, tmp_path):
    pipe = tiny_pipeline(fixtures_dir, tmp_path)
    save_pipeline(pipe, tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert loaded.name == "tiny"
    for a, b in [(pipe.dalle, loaded.dalle), (pipe.vae, loaded.vae), (pipe.upscaler, loaded.upscaler),
                 (pipe.clip.model, loaded.clip.model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.tokenizer.encode("рыжий котик") == pipe.tokenizer.encode("рыжий котик")
    without = load_pipeline(str(tmp_path / "pipe"), clip=False, upscaler=False)
    assert without.clip is None and without.upscaler is None


def test_save_refuses_a_non_empty_directory(fixtures_dir, tmp_path):
    pipe = tiny_pipeline(fixtures_dir, tmp_path, clip=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pipeline(pipe, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_unknown_pipeline_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown pipeline 'Malevitch'\. Available: .*Malevich"):
        load_pipeline("Malevitch")
    assert "Kandinsky" in list_pipelines()
