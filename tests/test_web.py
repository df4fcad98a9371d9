"""The web UI without a browser: its pure functions (checks, seeds, cancel flag, image prompts, the zip),
the Blocks page built over the demo model, and the ``serve`` command's arguments."""
import copy
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rudalle_pipe import web_jobs
from rudalle_pipe.cli import EXIT_FAILURE, EXIT_USAGE, main
from rudalle_pipe.generation import GenerationCancelled
from rudalle_pipe.web_jobs import (CancelFlag, WebSettings, ZipCache, as_int, check_settings, check_upload,
                                   make_callback, make_prompt_spec, preset_pairs, resolve_seed)

RED_CIRCLE = "большой красный круг в центре на сером фоне"


@pytest.fixture(scope="module")
def demo():
    from rudalle_pipe.pipeline import load_pipeline

    return load_pipeline("demo", clip=True, upscaler=True)


# ------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("change, message", [
    ({"top_p": 0.0}, "top-p must be a finite number in (0, 1], got 0.0"),
    ({"top_k": 513}, "top-k must be in [1, 512], got 513"),
    ({"temperature": float("nan")}, "temperature must be a finite number > 0, got nan"),
    ({"num_images": 257}, "candidates must be in [1, 256], got 257"),
    ({"prompt": "   "}, "the prompt is empty"),
    ({"guidance_scale": 0.0}, "guidance scale must be a finite number in (0, 50"),
    ({"negative_prompt": "синий"}, "negative prompt 'синий' has no effect without guidance (guidance scale 1)"),
    ({"negative_prompt": " ", "guidance_scale": 3.0}, "negative prompt is blank"),
    ({"seed": -1}, "seed must be in [0,"),
])
def test_check_settings_names_the_field_and_the_valid_range(change, message):
    settings = WebSettings(prompt=RED_CIRCLE, top_k=512, seed=0)
    check_settings(settings, vocab=512)  # the defaults pass
    for key, value in change.items():
        setattr(settings, key, value)
    with pytest.raises(ValueError) as err:
        check_settings(settings, vocab=512)
    assert message in str(err.value)


def test_whole_numbers_are_not_rounded():
    assert as_int("top-k", 3.0) == 3 and as_int("top-k", 7) == 7
    for bad in (2.5, float("inf"), None, True, "3"):
        with pytest.raises(ValueError, match="top-k must be a whole number"):
            as_int("top-k", bad)


def test_seed_is_the_one_typed_or_a_fresh_random_one():
    assert resolve_seed(12.0, False) == 12
    drawn = {resolve_seed(12, True) for _ in range(8)}
    assert len(drawn) > 1 and all(0 <= s <= web_jobs.MAX_RANDOM_SEED for s in drawn)
    with pytest.raises(ValueError, match="seed is empty"):
        resolve_seed(None, False)
    with pytest.raises(ValueError, match="seed must be >= 0, got -3"):
        resolve_seed(-3, False)


def test_presets_are_the_originals_pairs_clipped_to_the_vocabulary_with_a_note():
    assert [(k, p) for _, k, p in preset_pairs(8192)] == [(2048, 0.995), (1536, 0.99), (1024, 0.99)]
    labels = preset_pairs(512)
    assert [(k, p) for _, k, p in labels] == [(512, 0.995), (512, 0.99), (512, 0.99)]
    assert "top-k 2048 clipped to this model's 512 codes" in labels[0][0]


def test_callback_reports_steps_and_cancels_once_the_flag_is_set():
    cancel, seen = CancelFlag(), []
    callback = make_callback(cancel, lambda batch, step, total, codes: seen.append((batch, step)))
    assert callback(1, 4, None) is True and callback(4, 4, None) is True
    assert callback(1, 4, None) is True  # a new batch starts at step 1 again
    assert seen == [(0, 1), (0, 4), (1, 1)]
    cancel.set()
    assert callback(2, 4, None) is False and seen == [(0, 1), (0, 4), (1, 1)]


def test_the_flag_stops_generate_images_at_the_next_step(demo):
    from rudalle_pipe.generation import generate_images

    cancel, steps = CancelFlag(), []

    def on_step(batch, step, total, codes):
        steps.append(step)
        if step == 5:
            cancel.set()  # as the Stop button does, from another thread

    with pytest.raises(GenerationCancelled) as err:
        generate_images(RED_CIRCLE, demo.tokenizer, demo.dalle, demo.vae, top_k=512, top_p=0.995, num_images=2,
                        seed=0, progress=False, callback=make_callback(cancel, on_step))
    assert steps == [1, 2, 3, 4, 5] and err.value.step == 5 and err.value.num_complete == 0  # not one step more


def test_upload_checks():
    check_upload(Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="is not a picture"):
        check_upload(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="at most 4096 px a side"):
        check_upload(Image.new("L", (4097, 8)))


def test_zip_cache_is_bounded_and_removed_on_close(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = ZipCache(max_files=2)
    assert list(tmp_path.iterdir()) == []  # no folder until a zip is asked for
    paths = [cache.new_path() for _ in range(2)]
    for p in paths:
        p.write_bytes(b"x")
    third = cache.new_path()
    third.write_bytes(b"x")
    assert not paths[0].exists() and paths[1].exists() and third.exists()
    cache.discard(third)
    assert not third.exists()
    cache.close()
    assert not cache.folder.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ image prompts
def _editor(picture, painted_box=None):
    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    if painted_box is not None:
        layer.paste((255, 0, 0, 255), painted_box)
    return {"background": picture, "layers": [layer], "composite": picture}


def test_prompt_specs_from_the_page():
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    grid = {"vae_resolution": 64, "vae_factor": 8}  # the demo: 8x8 codes
    none = {"up": 0, "down": 0, "left": 0, "right": 0}
    assert make_prompt_spec("none", None, none, paste_back=False, **grid) is None
    spec = make_prompt_spec("borders", _editor(picture), {**none, "up": 2}, paste_back=True, **grid)
    assert spec.borders == {"up": 2, "down": 0, "left": 0, "right": 0} and spec.kept == 16 and spec.paste_back
    spec = make_prompt_spec("painted mask", _editor(picture, (0, 0, 32, 64)), none, paste_back=False, **grid)
    assert spec.kept == 32 and spec.mask.getpixel((0, 0)) == 0 and spec.mask.getpixel((40, 0)) == 255
    with pytest.raises(ValueError, match="needs a picture"):
        make_prompt_spec("borders", {"background": None}, none, paste_back=False, **grid)
    with pytest.raises(ValueError, match=r"borders\['up'\].*must be in \[0, 7\], got 8"):
        make_prompt_spec("borders", _editor(picture), {**none, "up": 8}, paste_back=False, **grid)
    with pytest.raises(ValueError, match="keeps none of the 64 codes"):
        make_prompt_spec("borders", _editor(picture), none, paste_back=False, **grid)
    with pytest.raises(ValueError, match="nothing is painted"):
        make_prompt_spec("painted mask", _editor(picture), none, paste_back=False, **grid)
    with pytest.raises(ValueError, match="image prompt mode must be one of"):
        make_prompt_spec("outpaint", _editor(picture), none, paste_back=False, **grid)


@pytest.mark.slow
def test_an_image_prompt_keeps_its_pixels(demo):
    picture = Image.new("RGB", (64, 64), (30, 30, 200))
    spec = make_prompt_spec("painted mask", _editor(picture, (0, 32, 64, 64)), {}, paste_back=True,
                            vae_resolution=64, vae_factor=8)
    result = web_jobs.run_generation("demo", demo, WebSettings(prompt=RED_CIRCLE, top_k=512, num_images=2, seed=0),
                                     cancel=CancelFlag(), on_step=lambda *a: None, prompt_spec=spec)
    for image in result.candidates:  # pasted back: the kept upper half is the picture's own pixels
        assert np.array_equal(np.asarray(image)[:28], np.asarray(picture)[:28])
    assert result.image_prompt["kept"] == 32 and result.image_prompt["paste_back"] is True


# ------------------------------------------------------------------------------ a run and its zip
@pytest.mark.slow
def test_run_and_zip_hold_the_ranked_pngs_sheet_and_record(demo, tmp_path):
    from rudalle_pipe.contact_sheet import sheet_size

    settings = WebSettings(prompt=RED_CIRCLE, top_k=512, num_images=4, seed=5)
    steps = []
    result = web_jobs.run_generation("demo", demo, settings, cancel=CancelFlag(),
                                     on_step=lambda b, s, t, c: steps.append(s))
    assert steps[-1] == 64 and sorted(result.seeds) == [5, 6, 7, 8] and result.rank_by == "clip"
    assert [result.scores["rank"][i] for i in result.order] == [1, 2, 3, 4]
    clip = [result.scores["clip_score"][i] for i in result.order]
    assert clip == sorted(clip, reverse=True)
    assert web_jobs.caption(result, 0).startswith("#1 · CLIP ")
    big = web_jobs.upscale_image(result.candidates[result.order[1]], demo.upscaler)
    result.upscaled[1] = (4, big)
    path = web_jobs.write_zip(result, tmp_path / "run.zip")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        record = json.loads(archive.read("results.json"))
        images = {n: Image.open(io.BytesIO(archive.read(n))) for n in names if n.endswith(".png")}
    assert names == ["image_000.png", "image_001.png", "image_002.png", "image_003.png", "image_001_x4.png",
                     "contact_sheet.png", "results.json"]
    for pos, i in enumerate(result.order):
        assert images[f"image_{pos:03d}.png"].tobytes() == result.candidates[i].tobytes()
        assert record["images"][pos]["seed"] == result.seeds[i] and record["images"][pos]["rank"] == pos + 1
    assert images["image_001_x4.png"].size == (256, 256) and images["contact_sheet.png"].size == sheet_size(4, 64)
    assert record["upscaled"] == [{"file": "image_001_x4.png", "rank": 2, "scale": 4, "size": [256, 256]}]
    assert record["settings"]["top_p"] == 0.995 and record["model"] == "demo" and len(record["candidates"]) == 4
    with pytest.raises(FileExistsError):  # never replaces a file
        web_jobs.write_zip(result, path)


# ------------------------------------------------------------------------------ the page
def test_sessions_never_share_state():
    from rudalle_pipe.web import Session

    first = Session()
    first.selected, first.result = 3, object()
    second = copy.deepcopy(first)  # what gr.State does for each new page
    assert second is not first and second.result is None and second.selected == 0
    assert second.cancel is not first.cancel


@pytest.mark.slow
def test_build_app_lays_out_the_page_without_launching(demo):
    pytest.importorskip("gradio")
    from rudalle_pipe.web import ServedModel, build_app

    served = {"demo": ServedModel("demo", demo, 64, (4,), 64, 8)}
    app = build_app(served)
    blocks = {getattr(b, "elem_id", None): b for b in app.blocks.values()}
    for elem_id in ("prompt", "generate", "stop", "gallery", "download", "preview", "seed", "random_seed",
                    "top_p", "upscale", "use_as_prompt", "image_prompt"):
        assert elem_id in blocks, elem_id
    assert blocks["gallery"].format == blocks["preview"].format == blocks["image_prompt"].format == "png"
    assert not blocks["model"].visible  # one model: no picker
    assert "x4" in str(blocks["upscale_factor"].choices)
    assert app.delete_cache is not None
    two = build_app({"demo": served["demo"], "other": ServedModel("other", demo, 64, (4,), 64, 8)})
    assert {getattr(b, "elem_id", None): b for b in two.blocks.values()}["model"].visible
    with pytest.raises(ValueError, match="at least one model"):
        build_app({})


@pytest.mark.slow
def test_only_the_served_models_can_be_chosen(demo):
    gr = pytest.importorskip("gradio")
    from rudalle_pipe.web import ServedModel, Session, build_app

    app = build_app({"demo": ServedModel("demo", demo, 64, (4,), 64, 8)})
    generate = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "on_generate")
    args = [RED_CIRCLE, 4, 0, False, 512, 0.995, 1.0, 1.0, "", "none", None, 0, 0, 0, 0, False, Session()]
    with pytest.raises(gr.Error, match="unknown model '/tmp/other'; this server offers: demo"):
        next(generate("/tmp/other", *args))  # a path typed into the page (the picker only offers names)
    with pytest.raises(gr.Error, match=r"top-p must be a finite number in \(0, 1\], got 0.0"):
        next(generate("demo", *args[:5], 0.0, *args[6:]))
    seed = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "seed")
    assert next(generate("demo", *args))[seed] == 0  # a served model starts drawing, the seed shown


def test_the_page_warns_about_words_outside_the_demo_vocabulary(demo):
    from rudalle_pipe.web import ServedModel, _oov_text, _vocabulary_text

    model = ServedModel("demo", demo, 64, (4,), 64, 8)
    assert _oov_text(model, RED_CIRCLE) == ""
    assert "рыжий, котик" in _oov_text(model, "рыжий котик на сером фоне")
    assert "knows 37 words" in _vocabulary_text(model) and "треугольник" in _vocabulary_text(model)


# ------------------------------------------------------------------------------ the command
def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_serve_without_gradio_says_how_to_install_it(capsys, monkeypatch):
    import importlib.util

    from rudalle_pipe import cli_serve

    real = importlib.util.find_spec
    monkeypatch.setattr(cli_serve.importlib.util, "find_spec", lambda name: None if name == "gradio" else real(name))
    code, _, err = run(capsys, "serve", "--device", "cpu")
    assert code == EXIT_FAILURE and err.count("\n") == 1
    assert 'pip install "rudalle-pipe[web]"' in err


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port must be in [1, 65535], got 0"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "demo", "--model", "demo"], "--model 'demo' is given twice"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
])
def test_serve_refuses_bad_arguments_before_loading(capsys, argv, message):
    code, _, err = run(capsys, "serve", *argv)
    assert code == EXIT_USAGE and message in err


def test_serve_binds_localhost_and_share_warns(capsys, monkeypatch):
    pytest.importorskip("gradio")
    from rudalle_pipe import web

    calls = {}
    monkeypatch.setattr(web, "load_models", lambda names, **kw: calls.setdefault("models", (names, kw)) and {})
    monkeypatch.setattr(web, "build_app", lambda models, zips: "app")
    monkeypatch.setattr(web, "launch", lambda app, **kw: calls.setdefault("launch", kw))
    code, _, err = run(capsys, "serve")
    assert code == 0 and err == ""
    assert calls["models"][0] == ["demo"] and calls["launch"] == {"host": "127.0.0.1", "port": 7860, "share": False}
    calls.clear()
    code, _, err = run(capsys, "serve", "--share", "--model", "demo", "--port", "9000")
    assert code == 0 and calls["launch"]["share"] is True and "public gradio.live link" in err


def test_serve_keeps_gradios_cache_in_a_private_folder_it_removes(monkeypatch, tmp_path):
    """Gradio reads GRADIO_TEMP_DIR when imported: serve points it at a new folder and removes that folder at
    exit, even when loading fails; a GRADIO_TEMP_DIR the user set is used and left alone."""
    import tempfile

    from rudalle_pipe import cli_serve, web

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.delitem(sys.modules, "gradio", raising=False)  # as in a fresh `rudalle-pipe serve`
    seen = []

    def failing_load(names, **kw):
        seen.append(os.environ["GRADIO_TEMP_DIR"])
        (Path(seen[-1]) / "shown.png").write_bytes(b"a user's picture")
        raise RuntimeError("weights missing")

    monkeypatch.setattr(web, "load_models", failing_load)
    assert main(["serve"]) == EXIT_FAILURE
    assert Path(seen[0]).parent == tmp_path and Path(seen[0]).name.startswith("rudalle_gradio_")
    assert list(tmp_path.iterdir()) == [] and "GRADIO_TEMP_DIR" not in os.environ
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(mine))
    assert main(["serve"]) == EXIT_FAILURE
    assert seen[1] == str(mine) and (mine / "shown.png").exists()


def test_serve_help_imports_neither_torch_nor_gradio():
    body = ("import sys\nfrom rudalle_pipe.cli import main\nmain(['serve', '--help'])\n"
            "print([m for m in ('torch', 'gradio', 'PIL') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("[]") and "--share" in done.stdout


# ------------------------------------------------------------------------------ the Space
def _space_module():
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("space_app", REPO_ROOT / "examples" / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: nothing loads or launches on import
    return module


def test_the_space_offers_malevich_only_with_a_gpu(monkeypatch):
    pytest.importorskip("gradio")
    space = _space_module()
    monkeypatch.setattr(space.torch.cuda, "is_available", lambda: False)
    assert space.model_names() == ["demo"]
    monkeypatch.setattr(space.torch.cuda, "is_available", lambda: True)
    assert space.model_names() == ["demo", "Malevich"]
    monkeypatch.setenv("RUDALLE_SPACE_MALEVICH", "0")
    assert space.model_names() == ["demo"]


@pytest.mark.slow
def test_the_space_builds_the_same_page_on_the_demo(monkeypatch):
    pytest.importorskip("gradio")
    from conftest import REPO_ROOT

    space = _space_module()
    monkeypatch.setattr(space.torch.cuda, "is_available", lambda: False)
    app = space.create_app()
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"prompt", "generate", "stop", "gallery", "download"} <= ids and app.title == space.TITLE
    front = (REPO_ROOT / "examples" / "space" / "README.md").read_text("utf-8").split("---")[1]
    fields = dict(line.split(": ", 1) for line in front.strip().splitlines())
    assert fields["sdk"] == "gradio" and fields["app_file"] == "app.py"
    import gradio

    assert fields["sdk_version"] == gradio.__version__  # the version the tests ran with


def test_launch_binds_localhost_and_limits_uploads():
    pytest.importorskip("gradio")
    from rudalle_pipe.web import MAX_UPLOAD_BYTES, launch

    class App:
        def launch(self, **kwargs):
            self.kwargs = kwargs

    app = App()
    launch(app, block=False)
    kw = app.kwargs
    assert (kw["server_name"], kw["server_port"], kw["share"]) == ("127.0.0.1", 7860, False)
    assert kw["max_file_size"] == MAX_UPLOAD_BYTES == 16 * 2**20 and kw["prevent_thread_lock"] is True
    assert kw["ssr_mode"] is False and kw["show_error"] is False  # unexpected errors: one line, no traceback
