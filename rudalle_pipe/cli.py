"""The ``rudalle-pipe`` command line (also ``python -m rudalle_pipe``).

Verbs:

* ``rudalle-pipe generate "TEXT" ["TEXT" ...] [options]`` runs the whole chain (load -> generate ->
  rerank by CLIP, perplexity or both -> Real-ESRGAN upscale) and writes PNGs, a contact sheet and
  ``results.json`` (:mod:`rudalle_pipe.cli_generate`).
  With ``--image-prompt IMG --borders SPEC|--mask MASK`` it keeps parts of a picture (see
  :mod:`rudalle_pipe.cli_image_prompt`); ``--paste-back`` restores the kept pixels in each decoded
  candidate before reranking, upscaling and the contact sheet.
* ``rudalle-pipe outpaint IMG TEXT --right K | --down K`` extends a picture and writes the stitched
  panoramas (:mod:`rudalle_pipe.cli_outpaint`).
* ``rudalle-pipe finetune DATA --out DIR [options]`` finetunes a generator on a folder of pictures
  (see :mod:`rudalle_pipe.finetune`) and, for a bundled or local pipeline, writes ``DIR/pipeline`` that
  ``generate --model DIR/pipeline`` uses.
* ``rudalle-pipe serve [--model M ...]`` serves the web page (:mod:`rudalle_pipe.cli_serve`; needs
  ``pip install "rudalle-pipe[web]"``).
* ``rudalle-pipe models`` lists what can be loaded and whether it is in the Hugging Face cache.

Exit status: 0 on success; 2 when the command line is wrong (argparse errors, invalid values such as
``--top-p 1.5``, an unknown ``--model``, a stage the chosen pipeline cannot run); 1 when running
fails (missing weights offline, output files that already exist, an ``--out`` that cannot be written or
lacks the room the run needs, any other error); 130 when interrupted. Errors are one line on stderr
(never empty) naming the flag as typed; ``-v`` adds tracebacks and INFO logs.

Adding a verb: write ``_add_<verb>(subparsers, common)`` that builds its subparser and sets
``func=<function(args) -> int>``, and append it to :data:`VERBS`. A large verb lives in its own module
(``finetune``: :mod:`rudalle_pipe.cli_finetune`) and imports the shared helpers here lazily.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .checks import one_line as _one_line  # light: the command line imports torch lazily
from .cli_finetune import add_finetune
from .cli_generate import add_generate, cmd_generate  # noqa: F401 (old import path)
from .cli_outpaint import add_outpaint
from .cli_serve import add_serve

logger = logging.getLogger(__name__)

__all__ = ["main", "UsageError", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

PROG = "rudalle-pipe"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
UPSCALE_CHOICES = ("x2", "x4", "x8", "none")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TOP_K = 2048  # clipped to the model's image vocabulary when that is smaller


class UsageError(Exception):
    """The command line is wrong: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _describe(err: BaseException) -> str:
    """One line for an error, never empty: the message, or the error's type when it has none."""
    return _one_line(err) or f"{type(err).__name__} (no message; -v shows the traceback)"


# ----------------------------------------------------------------------------------- generate
FLAGS = {"top_k": "--top-k", "top_p": "--top-p", "temperature": "--temperature", "num_images": "--num-images",
         "batch_size": "--batch-size", "seed": "--seed"}  # API argument -> its flag, for error messages


@dataclass
class _Source:
    """Where ``--model`` points, read without loading any weights."""

    name: str  # as given on the command line
    kind: str  # "bundled", "directory" or "hub"
    image_vocab: int  # generator's image vocabulary (top_k upper bound)
    upscale_scales: Optional[tuple[int, ...]]  # scales available locally; None = any Hub scale
    has_clip: bool  # a CLIP reranker can be loaded
    image_side: int  # side in px of a generated image (before upscaling)
    vae_resolution: int = 256  # px the VQGAN encodes an image prompt at
    vae_factor: int = 8  # px per code side (the prompt grid is vae_resolution / vae_factor codes a side)


def default_model() -> str:
    """``"demo"`` when that bundled pipeline exists, else ``"Malevich"``."""
    from .pipeline import list_pipelines

    return "demo" if "demo" in list_pipelines() else "Malevich"


def _resolve_model(name: str) -> _Source:
    from .dalle import DalleConfig
    from .hub import read_config
    from .pipeline import resolve_pipeline
    from .registry import PRETRAINED
    from .vae import VQGANConfig

    try:
        kind, directory = resolve_pipeline(name, what="model")
    except ValueError as err:
        raise UsageError(f"--model: {err}") from err
    if directory is None:  # a Hub generator preset: the 256 px Sber VQGAN
        dalle = DalleConfig(**PRETRAINED[name].config)
        vqgan = VQGANConfig()
        return _Source(name, kind, dalle.image_vocab_size, None, True,
                       dalle.image_tokens_per_dim * vqgan.downsample_factor, vqgan.resolution,
                       vqgan.downsample_factor)
    dalle = read_config(directory / "dalle", DalleConfig, model_type="rudalle")
    vae = read_config(directory / "vae", VQGANConfig, model_type="vqgan")
    side = dalle.image_tokens_per_dim * vae.downsample_factor * (2 if vae.dwt else 1)
    scales: tuple[int, ...] = ()
    if (directory / "upscaler").is_dir():
        from .realesrgan import RRDBNetConfig

        scales = (read_config(directory / "upscaler", RRDBNetConfig, model_type="rrdbnet").scale,)
    return _Source(name, kind, dalle.image_vocab_size, scales, (directory / "clip").is_dir(), side, vae.resolution,
                   vae.downsample_factor)


def _load_pipeline(name: str, *, dtype: str, **kwargs):
    """:func:`rudalle_pipe.load_pipeline` for a ``--dtype`` value: ``float32``, ``float16``, ``bfloat16``, or
    ``int8`` (the generator loaded in fp32, then its linear layers quantized: :func:`rudalle_pipe.quantize_int8`).
    ``kwargs`` go to ``load_pipeline``."""
    import torch

    from .pipeline import load_pipeline

    int8 = dtype == "int8"
    pipe = load_pipeline(name, dtype=torch.float32 if int8 else getattr(torch, dtype), **kwargs)
    if int8:
        from .quantize import quantize_int8

        quantize_int8(pipe.dalle)
    return pipe


def _resolve_device(device: Optional[str]) -> str:
    """``device`` if this torch can run on it (cpu; cuda, cuda:N and mps when available), else a
    :class:`UsageError` listing the valid choices; ``None`` picks cuda if available, else cpu."""
    import torch

    cuda = torch.cuda.is_available()
    if device is None:
        return "cuda" if cuda else "cpu"
    choices = ["cpu"]
    if cuda:
        choices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices += ["mps", "mps:0"]
    if device not in choices:
        raise UsageError(f"--device {device!r} is not a device this torch can run on; valid choices: "
                         f"{', '.join(choices)}")
    return device


def _check_text(flag: str, value: str) -> None:
    """Refuse text that is not valid UTF-8 (undecodable argv bytes arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ord(value[err.start])
        what = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise UsageError(f"{flag} is not valid UTF-8 ({what} at character {err.start}); pass UTF-8 text") from None


# ------------------------------------------------------------------------------------- models
def _cached(repo_ids: Sequence[str], filename: str, cache_dir: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(r, filename, cache_dir=cache_dir), str) for r in repo_ids)


def _model_rows(cache_dir: Optional[str]) -> list[tuple[str, str, str, str, str]]:
    """``(name, kind, repo, file, cached)`` for everything ``generate`` can load."""
    from .pipeline import BUNDLED_DIR, list_pipelines
    from .registry import PRETRAINED, list_pretrained

    kinds = {"dalle": "generator", "tokenizer": "tokenizer", "vae": "vqgan", "realesrgan": "upscaler"}
    hub = list_pretrained("dalle")
    rows = [(name, "pipeline", "(bundled)", str(BUNDLED_DIR / name), "bundled")
            for name in list_pipelines() if name not in hub]
    for name, entry in PRETRAINED.items():
        repos = (entry.repo_id, *entry.fallback_repo_ids)
        rows.append((name, kinds[entry.kind], entry.repo_id, entry.filename,
                     "yes" if _cached(repos, entry.filename, cache_dir) else "no"))
    try:
        import open_clip

        from .clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
    except ImportError:  # open_clip is a dependency, but listing must not depend on it
        return rows
    repo = (open_clip.get_pretrained_cfg(DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED).get("hf_hub") or "").strip("/")
    if repo:
        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        found = [f for f in files if _cached([repo], f, cache_dir)]
        rows.append(("clip", "reranker", repo, (found or files)[0], "yes" if found else "no"))
    text_repo = (open_clip.get_model_config(DEFAULT_CLIP_MODEL) or {}).get("text_cfg", {}).get("hf_model_name")
    if text_repo:
        for filename in ("config.json", "tokenizer.json"):
            rows.append(("clip_text", "reranker", text_repo, filename,
                         "yes" if _cached([text_repo], filename, cache_dir) else "no"))
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    """``rudalle-pipe models``: an aligned table on stdout."""
    from huggingface_hub import constants

    header = ("NAME", "KIND", "REPO", "FILE", "CACHED")
    rows = [header, *_model_rows(args.cache_dir)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    offline = " (HF_HUB_OFFLINE: cache only)" if constants.HF_HUB_OFFLINE else ""
    lines = [f"Hugging Face cache: {args.cache_dir or constants.HF_HUB_CACHE}{offline}",
             f"default --model: {default_model()}", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += ["", "generate --model takes a pipeline or generator above, or a pipeline directory "
                  "(save_pipeline); the Hub generators also load the tokenizer, vqgan, clip and upscaler."]
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _add_models(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("models", parents=[common], help="list loadable models and whether they are cached",
                              description="List the bundled pipelines, Hub generators, tokenizer, VQGANs, "
                                          "upscalers and the default CLIP, with their Hub repo and file and "
                                          "whether each is already in the Hugging Face cache.")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="Hugging Face cache (default: the HF default)")
    p.set_defaults(func=cmd_models)


# --------------------------------------------------------------------------------------- main
VERBS: list[Callable[..., None]] = [add_generate, add_outpaint, add_finetune, _add_models, add_serve]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="INFO logs and tracebacks on stderr")
    parser = _Parser(prog=PROG, description="ruDALL-E text-to-image generation from the command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in VERBS:
        add(subparsers, common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    args = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("rudalle_pipe")
    old_level, old_propagate = package_logger.level, package_logger.propagate
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING)
    package_logger.propagate = False  # a root handler (open_clip's logging.info() installs one) would repeat them
    hub_logger = logging.getLogger("huggingface_hub")  # its retry/warning lines would bury our one-line error
    old_hub_level = hub_logger.level
    hub_logger.setLevel(logging.CRITICAL)
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            package_logger.setLevel(logging.INFO)
            hub_logger.setLevel(old_hub_level)
        return args.func(args)
    except SystemExit as exit_:  # --help / --version
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    except UsageError as err:
        sys.stderr.write(f"{PROG}: error: {_describe(err)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (traceback with -v)
        if args is not None and args.verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"{PROG}: error: {_describe(err)}\n")
        return EXIT_FAILURE
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        package_logger.propagate = old_propagate
        hub_logger.setLevel(old_hub_level)
