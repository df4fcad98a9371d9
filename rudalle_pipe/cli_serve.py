"""``rudalle-pipe serve``: the web page (:mod:`rudalle_pipe.web`) on a local port.

``--model`` may be repeated: the page then offers a picker with exactly those models. The default is
the bundled demo, so the page runs offline on a CPU. It binds 127.0.0.1 unless ``--host`` says
otherwise; ``--share`` (a public gradio.live link) is opt-in and warns. Gradio is the ``[web]`` extra:
without it the command says how to install it (exit 1). Every argument is checked before any model
loads (exit 2 for a bad command line, see :mod:`rudalle_pipe.cli`).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["add_serve", "cmd_serve", "INSTALL_HINT"]

INSTALL_HINT = 'the web UI needs gradio, which is not installed: pip install "rudalle-pipe[web]"'


class MissingExtraError(RuntimeError):
    """An optional dependency of the command is not installed (exit 1, one line)."""


def _check_serve_args(args: argparse.Namespace) -> list[str]:
    """The models to serve (checked, without loading); the port and device are checked too."""
    from .checks import check_int
    from .cli import UsageError, _check_text, _one_line, _resolve_device, _resolve_model, default_model

    names = list(args.model or [default_model()])
    for name in names:
        _check_text("--model", name)
        _resolve_model(name)  # UsageError naming the valid choices
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"--model {duplicates[0]!r} is given twice; name each model once")
    try:
        check_int("--port", args.port, low=1, high=65535)
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    _check_text("--host", args.host)
    args.device = _resolve_device(args.device)
    return names


def cmd_serve(args: argparse.Namespace) -> int:
    """``rudalle-pipe serve``: load the models, build the page and serve it until interrupted."""
    from .cli import EXIT_OK

    names = _check_serve_args(args)
    if importlib.util.find_spec("gradio") is None:
        raise MissingExtraError(INSTALL_HINT)
    own_cache = _private_gradio_cache()  # before gradio is imported
    try:
        _serve(args, names)
    finally:
        if own_cache is not None:  # Gradio's copies of every image the page showed
            shutil.rmtree(own_cache, ignore_errors=True)
            os.environ.pop("GRADIO_TEMP_DIR", None)
    return EXIT_OK


def _serve(args: argparse.Namespace, names: list[str]) -> None:
    from .web import build_app, launch, load_models
    from .web_jobs import ZipCache

    if args.share:
        logger.warning("--share: Gradio will make this page reachable from the internet through a public "
                       "gradio.live link; anyone with the link can run generations on this machine")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("--host %s: the page is reachable from other machines on this network", args.host)
    models = load_models(names, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    zips = ZipCache()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` closes the server like Ctrl-C
    try:
        launch(build_app(models, zips=zips), host=args.host, port=args.port, share=args.share)
    finally:
        signal.signal(signal.SIGTERM, previous)
        zips.close()  # the zips this server offered: no per-user file outlives it


def _private_gradio_cache() -> Optional[str]:
    """Point Gradio's file cache (``GRADIO_TEMP_DIR``, read when gradio is imported) at a new private folder,
    which the server removes at exit: otherwise every image the page showed stays in the shared
    ``$TMPDIR/gradio`` after the server stops. A ``GRADIO_TEMP_DIR`` the user set is kept, and so are its files."""
    if os.environ.get("GRADIO_TEMP_DIR") or "gradio" in sys.modules:
        return None
    folder = tempfile.mkdtemp(prefix="rudalle_gradio_")
    os.environ["GRADIO_TEMP_DIR"] = folder
    return folder


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def add_serve(subparsers, common: argparse.ArgumentParser) -> None:
    """The ``serve`` subparser."""
    from .cli import DTYPES

    p = subparsers.add_parser(
        "serve", parents=[common], help="a web page: prompt -> candidates -> upscale -> download (needs [web])",
        description="Serve the web UI (Gradio) on HOST:PORT: prompt, sampling settings with the original's "
                    "recommended top-k/top-p pairs, seeds, live previews, Stop, a gallery ranked by CLIP (or "
                    "perplexity), upscaling, image prompts and a zip download. Needs the web extra: "
                    'pip install "rudalle-pipe[web]".',
        epilog="Exit status: 0 after Ctrl-C or SIGTERM, 1 runtime failure (gradio missing, weights missing, port busy), "
               "2 bad command line.")
    p.add_argument("--model", action="append", default=None, metavar="NAME_OR_DIR",
                   help="a bundled pipeline, a Hub generator or a pipeline directory; repeat it to offer a "
                        "model picker (default: demo if bundled, else Malevich)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--device", default=None, metavar="D",
                   help="cpu, cuda, cuda:N or mps, as available here (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES + ("int8",), default="float32",
                   help="generator precision (default: float32)")
    p.add_argument("--share", action="store_true",
                   help="also publish a public gradio.live link (off by default; anyone with it can use the page)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="Hugging Face cache (default: the HF default)")
    p.set_defaults(func=cmd_serve)
