"""The web page of ``rudalle-pipe serve``: a Gradio Blocks app over loaded pipelines.

:func:`load_models` loads the pipelines, :func:`build_app` lays the page out (nothing is loaded there)
and :func:`launch` serves it. Gradio is an optional extra (``pip install "rudalle-pipe[web]"``) imported
only inside these functions. What the page runs (checks, seeds, cancelling, ranking, the zip) lives in
:mod:`rudalle_pipe.web_jobs`, without Gradio.

Stable element ids for tests and automation: ``prompt`` (a ``textarea`` inside), ``generate``, ``stop``,
``gallery``, ``download``; also ``preview``, ``status``, ``seed``, ``random_seed``, ``num_images``,
``top_k``, ``top_p``, ``temperature``, ``upscale``, ``upscaled``, ``use_as_prompt``, ``image_prompt``, ``oov``.

Concurrency: the queue runs at most one generation (or upscale) per model at a time (a lock per model;
``concurrency_limit`` is the number of models) and shows waiting pages their place. Each page's results
live in its own ``gr.State``; Stop sets that page's cancel flag, which the generation callback reads at
every step, so sampling stops within one step.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .checks import one_line
from .web_jobs import (MAX_WEB_IMAGES, PROMPT_MODES, CancelFlag, GenerationResult, WebSettings, ZipCache, as_int,
                       caption, check_settings, make_prompt_spec, preset_pairs, resolve_seed, run_generation,
                       upscale_image, upscaled_name, write_zip)

logger = logging.getLogger(__name__)

__all__ = ["ServedModel", "Session", "load_models", "build_app", "launch", "DEMO_EXAMPLES", "MAX_UPLOAD_BYTES"]

DEMO_EXAMPLES = ("большой красный круг в центре на сером фоне", "маленькая жёлтая звезда слева на синем фоне",
                 "на чёрном фоне большой голубой ромб снизу", "большой фиолетовый треугольник справа на белом фоне")
HUB_EXAMPLES = ("рыжий котик", "горы под облачным небом", "озеро в лесу на закате")
MAX_UPLOAD_BYTES = 16 * 2**20  # uploads larger than this are refused by the server (launch(max_file_size=))
PREVIEW_INTERVAL_S = 0.25  # at most one preview decode per this many seconds (longer when decoding is slow)
PREVIEW_ROWS = 16  # previews show at most this many candidates of the current batch
DELETE_CACHE = (600, 3600)  # Gradio deletes its cached files older than 1 h, checking every 10 min


@dataclass
class ServedModel:
    """A loaded pipeline and what the page needs to know about it."""

    name: str
    pipe: Any  # rudalle_pipe.Pipeline
    image_side: int  # px of a generated image
    upscale_scales: tuple[int, ...]  # factors the page offers
    vae_resolution: int = 256
    vae_factor: int = 8
    cache_dir: Optional[str] = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one run per model at a time
    upscalers: dict[int, Any] = field(default_factory=dict)  # factor -> RRDBNet, loaded when first asked

    @property
    def vocab(self) -> int:
        return self.pipe.dalle.config.image_vocab_size

    def upscaler(self, scale: int):
        """The x``scale`` Real-ESRGAN: the pipeline's own, or (Hub models) loaded on first use."""
        if scale not in self.upscale_scales:
            raise ValueError(f"model {self.name!r} has no x{scale} upscaler; available: "
                             f"{', '.join(f'x{s}' for s in self.upscale_scales) or 'none'}")
        if self.pipe.upscaler is not None and self.pipe.upscaler.scale == scale:
            return self.pipe.upscaler
        if scale not in self.upscalers:
            from .realesrgan import get_realesrgan

            device = next(self.pipe.vae.parameters()).device
            self.upscalers[scale] = get_realesrgan(f"x{scale}", device=device, cache_dir=self.cache_dir)
        return self.upscalers[scale]


class Session:
    """One page's state (a ``gr.State``): its cancel flag, last result, selected image and zip."""

    def __init__(self) -> None:
        self.cancel = CancelFlag()
        self.result: Optional[GenerationResult] = None
        self.selected = 0  # rank position of the image that "upscale" / "use as image prompt" act on
        self.zip_path = None
        self.pending = False  # a run was asked for and has not ended (queued or drawing)

    def __deepcopy__(self, memo) -> "Session":  # gr.State copies its default value for each new page
        return Session()


def load_models(names: Sequence[str], *, device: str = "cpu", dtype: str = "float32",
                cache_dir: Optional[str] = None) -> dict[str, ServedModel]:
    """Load each pipeline in ``names`` (bundled names, Hub generators or pipeline folders) with its CLIP
    and upscaler; Hub models fetch their x2/x4/x8 upscalers when first asked for one."""
    from .cli import _load_pipeline, _resolve_model

    models = {}
    for name in names:
        source = _resolve_model(name)
        pipe = _load_pipeline(name, dtype=dtype, device=device, cache_dir=cache_dir, clip=source.has_clip,
                              upscaler=source.kind != "hub" and bool(source.upscale_scales))
        scales = (2, 4, 8) if source.upscale_scales is None else tuple(source.upscale_scales)
        models[name] = ServedModel(name, pipe, source.image_side, scales, source.vae_resolution, source.vae_factor,
                                   cache_dir)
    return models


def _grid(images: list):
    from .contact_sheet import sheet_columns
    from .show import image_grid

    return image_grid(images, nrow=sheet_columns(len(images)), padding=2, background=(128, 128, 128))


def _vocabulary_text(model: ServedModel) -> str:
    words = getattr(model.pipe.tokenizer, "vocabulary", None)
    if not words:
        return f"**{model.name}** draws from any Russian text."
    return (f"**{model.name}** knows {len(words)} words (other words still run, with a warning): "
            + ", ".join(sorted(words)))


def _oov_text(model: ServedModel, prompt: str) -> str:
    unknown = getattr(model.pipe.tokenizer, "unknown_words", lambda _: [])(prompt or "")
    if not unknown:
        return ""
    return (f"⚠️ Words {model.name} was not trained on: {', '.join(unknown)}. It still draws, but these words "
            "mean nothing to it.")


def build_app(models: dict[str, ServedModel], *, zips: Optional[ZipCache] = None, title: str = "rudalle-pipe",
              examples: Optional[Sequence[str]] = None):
    """The Gradio Blocks page over ``models`` (name -> :class:`ServedModel`, from :func:`load_models`).

    A model picker shows only with several models, and only their names can be chosen. ``zips``: the
    bounded folder for download zips (a new one when None). Nothing is loaded or launched here."""
    import gradio as gr

    from .generation import GenerationCancelled
    from .previews import preview_images

    if not models:
        raise ValueError("build_app needs at least one model (see load_models)")
    zips = zips or ZipCache()
    names = list(models)
    first = models[names[0]]
    max_side = max(m.vae_resolution // m.vae_factor for m in models.values())
    all_scales = sorted({s for m in models.values() for s in m.upscale_scales})
    if examples is None:
        has_vocab = any(getattr(m.pipe.tokenizer, "vocabulary", None) for m in models.values())
        examples = DEMO_EXAMPLES if has_vocab else HUB_EXAMPLES

    def model_of(name: str) -> ServedModel:
        if name not in models:  # only the served models, never a path typed into the page
            raise gr.Error(f"unknown model {name!r}; this server offers: {', '.join(names)}")
        return models[name]

    def fail(err: BaseException) -> gr.Error:
        return gr.Error(one_line(err) or type(err).__name__)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
        # a page's results are dropped when it closes, or an hour after its last change (its files are gone by then)
        session = gr.State(Session(), time_to_live=DELETE_CACHE[1], delete_callback=lambda s: zips.discard(s.zip_path))
        gr.Markdown(f"# {title}\nText → images with ruDALL-E: generate candidates, rerank, upscale, download.")
        with gr.Row():
            with gr.Column(scale=2):
                model_dd = gr.Dropdown(names, value=names[0], label="model", visible=len(names) > 1,
                                       elem_id="model", allow_custom_value=False)
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt", placeholder=examples[0])
                oov = gr.Markdown("", elem_id="oov")
                vocab_md = gr.Markdown(_vocabulary_text(first), elem_id="vocabulary")
                gr.Examples([[e] for e in examples], inputs=[prompt], label="example prompts (click one)",
                            cache_examples=False)
                with gr.Row():
                    num_images = gr.Slider(1, MAX_WEB_IMAGES, value=4, step=1, label="candidates",
                                           elem_id="num_images")
                    seed = gr.Number(0, label="seed (the one used is shown here)", elem_id="seed")
                    randomize = gr.Checkbox(True, label="random seed", elem_id="random_seed")
                with gr.Accordion("sampling", open=False, elem_id="sampling"):
                    pairs = preset_pairs(first.vocab)
                    preset = gr.Radio([p[0] for p in pairs], value=pairs[0][0], label="recommended top-k / top-p")
                    with gr.Row():
                        top_k = gr.Number(pairs[0][1], label="top-k", elem_id="top_k")
                        top_p = gr.Number(pairs[0][2], label="top-p", elem_id="top_p")
                        temperature = gr.Number(1.0, label="temperature", elem_id="temperature")
                    with gr.Row():
                        guidance = gr.Number(1.0, label="guidance scale (1 = none)", elem_id="guidance_scale")
                        negative = gr.Textbox(label="negative prompt (with guidance)", elem_id="negative_prompt")
                with gr.Accordion("image prompt", open=False, elem_id="image_prompt_box"):
                    ip_mode = gr.Radio(list(PROMPT_MODES), value="none", label="keep parts of a picture",
                                       elem_id="image_prompt_mode")
                    editor = gr.ImageEditor(type="pil", label="picture (paint over what to redraw)",
                                            elem_id="image_prompt", sources=["upload", "clipboard"], format="png")
                    with gr.Row():
                        borders = [gr.Slider(0, max_side - 1, value=0, step=1, label=f"keep {k} (codes)",
                                             elem_id=f"keep_{k}")
                                   for k in ("up", "down", "left", "right")]
                    paste_back = gr.Checkbox(False, label="paste the kept pixels back", elem_id="paste_back")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                preview = gr.Image(label="preview (drawing)", type="pil", format="png", elem_id="preview",
                                   interactive=False, height=256)
                gallery = gr.Gallery(label="candidates, best first", format="png", elem_id="gallery", columns=4,
                                     object_fit="contain", interactive=False)
                with gr.Row():
                    scale = gr.Radio([f"x{s}" for s in all_scales], value=f"x{all_scales[0]}" if all_scales
                                     else None, label="upscale factor", elem_id="upscale_factor")
                    upscale = gr.Button("Upscale selected", elem_id="upscale", interactive=bool(all_scales))
                    use_prompt = gr.Button("Use as image prompt", elem_id="use_as_prompt")
                    download = gr.DownloadButton("Download zip", elem_id="download", interactive=False)
                upscaled = gr.Image(label="upscaled", type="pil", format="png", elem_id="upscaled",
                                    interactive=False)

        def on_model(name: str, text: str):
            model = model_of(name)
            new = preset_pairs(model.vocab)
            return (_vocabulary_text(model), _oov_text(model, text), gr.update(choices=[p[0] for p in new],
                    value=new[0][0]), new[0][1], new[0][2])

        def on_preset(name: str, label: str):
            for text, k, p in preset_pairs(model_of(name).vocab):
                if text == label:
                    return k, p
            raise gr.Error(f"unknown preset {label!r}")

        def on_generate(name, text, count, seed_value, random_seed, k, p, temp, scale_value, neg, mode, picture,
                        up, down, left, right, paste, state: Session, progress=gr.Progress()):
            try:
                yield from generate_run(name, text, count, seed_value, random_seed, k, p, temp, scale_value, neg,
                                        mode, picture, up, down, left, right, paste, state, progress)
            finally:
                state.pending = False

        def generate_run(name, text, count, seed_value, random_seed, k, p, temp, scale_value, neg, mode, picture,
                         up, down, left, right, paste, state: Session, progress):
            model = model_of(name)
            if state.cancel.is_set():  # Stop was pressed while this run waited for its turn
                yield {status: "stopped before it started"}
                return
            try:
                settings = WebSettings(prompt=text or "", num_images=as_int("candidates", count),
                                       top_k=as_int("top-k", k), top_p=p, temperature=temp,
                                       guidance_scale=scale_value, negative_prompt=(neg or None),
                                       seed=resolve_seed(seed_value, random_seed))
                check_settings(settings, vocab=model.vocab)
                spec = make_prompt_spec(mode, picture, {"up": as_int("up", up), "down": as_int("down", down),
                                        "left": as_int("left", left), "right": as_int("right", right)},
                                        paste_back=paste, vae_resolution=model.vae_resolution,
                                        vae_factor=model.vae_factor)
            except (TypeError, ValueError) as err:
                raise fail(err) from None
            zips.discard(state.zip_path)
            state.result, state.zip_path, state.selected = None, None, 0
            warn = _oov_text(model, settings.prompt)
            yield {seed: settings.seed, gallery: [], preview: None, upscaled: None,
                   download: gr.update(value=None, interactive=False),
                   status: f"drawing {settings.num_images} candidates, seed {settings.seed} … {warn}"}
            shared: dict[str, Any] = {"preview": None, "sent": None, "fraction": 0.0, "error": None, "last": 0.0,
                                      "interval": PREVIEW_INTERVAL_S}
            batches = -(-settings.num_images // settings.batch_size)
            done = threading.Event()

            def on_step(batch: int, step: int, total: int, codes) -> None:
                shared["fraction"] = (batch * total + step) / (batches * total)
                now = time.monotonic()
                if step == total or now - shared["last"] >= shared["interval"]:
                    shared["preview"] = _grid(preview_images(codes[:PREVIEW_ROWS], model.pipe.vae, step))
                    shared["last"] = time.monotonic()  # decoding takes at most a fifth of the drawing time:
                    shared["interval"] = max(PREVIEW_INTERVAL_S, 4 * (shared["last"] - now))

            def work() -> None:
                try:
                    with model.lock:
                        shared["result"] = run_generation(name, model.pipe, settings, cancel=state.cancel,
                                                          on_step=on_step, prompt_spec=spec)
                except BaseException as err:  # noqa: BLE001 - reported to the page below
                    shared["error"] = err
                finally:
                    done.set()

            threading.Thread(target=work, name="rudalle-web-generate", daemon=True).start()
            try:
                while not done.wait(0.1):
                    progress(shared["fraction"], desc="drawing")
                    if shared["preview"] is not shared["sent"]:
                        shared["sent"] = shared["preview"]
                        yield {preview: shared["sent"]}
            finally:
                if not done.is_set():  # the page went away or the event was cancelled: stop sampling
                    state.cancel.set()
            if shared["preview"] is not shared["sent"]:  # the last preview, before the final images
                yield {preview: shared["preview"]}
            err = shared["error"]
            if isinstance(err, GenerationCancelled):
                yield {status: f"stopped after {err.num_complete} finished candidates; nothing kept", preview: None}
                return
            if err is not None:
                logger.error("generation failed", exc_info=err)
                raise fail(err)
            result: GenerationResult = shared["result"]
            state.result = result
            state.zip_path = write_zip(result, zips.new_path())
            items = [(result.candidates[i], caption(result, pos)) for pos, i in enumerate(result.order)]
            ranked = "CLIP" if result.rank_by == "clip" else "perplexity (lower first)"
            yield {gallery: items, preview: shared["preview"],
                   download: gr.update(value=str(state.zip_path), interactive=True),
                   status: f"{len(items)} candidates ranked by {ranked}, seeds {settings.seed}–"
                           f"{settings.seed + settings.num_images - 1}; {result.timings.get('generate', 0):.1f} s "
                           f"drawing. {warn}"}

        def on_queued(state: Session):
            state.cancel.clear()
            state.pending = True
            return "waiting for its turn …"

        def on_stop(state: Session) -> None:
            if state.pending:  # the run itself reports that it stopped (no output here: it could land after that)
                state.cancel.set()  # read by the generation callback at its next step

        def on_select(state: Session, evt: gr.SelectData):
            state.selected = int(evt.index)
            return f"selected #{state.selected + 1}"

        def selected_image(state: Session):
            if state.result is None:
                raise gr.Error("nothing generated yet: press Generate first")
            return state.result.candidates[state.result.order[state.selected]]

        def on_upscale(factor: str, state: Session):
            image = selected_image(state)
            model = model_of(state.result.model)
            try:
                factor_int = int(str(factor).lstrip("x"))
                with model.lock:
                    big = upscale_image(image, model.upscaler(factor_int))
            except Exception as err:  # noqa: BLE001 - e.g. an x8 upscaler not in the cache offline
                logger.error("upscaling failed", exc_info=err)
                raise fail(err) from None
            state.result.upscaled[state.selected] = (factor_int, big)
            old, state.zip_path = state.zip_path, write_zip(state.result, zips.new_path())
            zips.discard(old)
            return (big, gr.update(value=str(state.zip_path), interactive=True),
                    f"#{state.selected + 1} upscaled to {big.width}x{big.height}; added to the zip as "
                    f"{upscaled_name(state.selected, factor_int)}")

        def on_use(state: Session, mode: str):
            image = selected_image(state)
            return ({"background": image, "layers": [], "composite": image},
                    "borders" if mode == "none" else mode, f"#{state.selected + 1} is now the image prompt")

        model_dd.change(on_model, [model_dd, prompt], [vocab_md, oov, preset, top_k, top_p], queue=False)
        prompt.change(lambda name, text: _oov_text(model_of(name), text), [model_dd, prompt], [oov], queue=False)
        preset.change(on_preset, [model_dd, preset], [top_k, top_p], queue=False)
        limit = len(models)  # with the per-model locks: one run per model at a time
        generate.click(on_queued, [session], [status], queue=False).then(
                             on_generate, [model_dd, prompt, num_images, seed, randomize, top_k, top_p, temperature,
                                           guidance, negative, ip_mode, editor, *borders, paste_back, session],
                             [seed, gallery, preview, upscaled, download, status], concurrency_limit=limit,
                             concurrency_id="generate")
        stop.click(on_stop, [session], None, queue=False)  # no cancels=: the run reports it stopped
        gallery.select(on_select, [session], [status], queue=False)
        upscale.click(on_upscale, [scale, session], [upscaled, download, status], concurrency_limit=limit,
                      concurrency_id="generate")
        use_prompt.click(on_use, [session, ip_mode], [editor, ip_mode, status], queue=False)
    app.queue(max_size=64, default_concurrency_limit=1)
    return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True) -> None:
    """Serve ``app`` (from :func:`build_app`) on ``host:port``; ``share`` asks Gradio for a public link."""
    # Gradio 6's default theme serves its fonts itself, so the page needs no network
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_BYTES, show_error=False,
               ssr_mode=False, prevent_thread_lock=not block, quiet=False)
