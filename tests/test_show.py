"""show() and image_grid(): grid arithmetic, saving without overwriting, notebook display, bad input."""
import sys
import types

import numpy as np
import pytest
from PIL import Image

from rudalle_pipe.show import image_grid, show


def solid(color, size=(8, 6), mode="RGB"):
    return Image.new(mode, size, color)


@pytest.mark.parametrize("n, nrow, cols, rows", [(1, 4, 1, 1), (3, 4, 3, 1), (4, 4, 4, 1), (5, 4, 4, 2),
                                                 (7, 3, 3, 3), (6, 1, 1, 6)])
def test_grid_size_arithmetic(n, nrow, cols, rows):
    grid = image_grid([solid((i, 0, 0)) for i in range(n)], nrow=nrow, padding=2)
    assert grid.size == (cols * 8 + (cols + 1) * 2, rows * 6 + (rows + 1) * 2)
    assert grid.mode == "RGB"


def test_grid_places_images_row_major_and_pads_last_row():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = np.asarray(image_grid([solid(c) for c in colors], nrow=2, padding=1))
    assert grid.shape == (2 * 6 + 3, 2 * 8 + 3, 3)
    assert tuple(grid[1, 1]) == colors[0]  # row 0, col 0
    assert tuple(grid[1, 1 + 8 + 1]) == colors[1]  # row 0, col 1
    assert tuple(grid[1 + 6 + 1, 1]) == colors[2]  # row 1, col 0
    assert grid[1 + 6 + 1 :, 1 + 8 + 1 :].max() == 0  # the padded cell is background
    assert grid[0].max() == 0 and grid[:, 0].max() == 0  # the margin


def test_size_resizes_every_cell_and_mixed_sizes_follow_the_first():
    images = [solid((9, 9, 9), (10, 10)), solid((200, 0, 0), (30, 20))]
    assert image_grid(images, size=16, padding=0).size == (32, 16)
    assert image_grid(images, size=(5, 7), padding=0).size == (10, 7)
    grid = np.asarray(image_grid(images, padding=0))  # default: the first image's size
    assert grid.shape == (10, 20, 3)
    assert tuple(grid[5, 15]) == (200, 0, 0)


def test_modes():
    gray = [solid(100, mode="L"), solid(200, mode="L")]
    assert image_grid(gray).mode == "L"
    mixed = image_grid([solid(100, mode="L"), solid((1, 2, 3))], padding=0)
    assert mixed.mode == "RGB" and tuple(np.asarray(mixed)[0, 0]) == (100, 100, 100)
    rgba = image_grid([solid((1, 2, 3, 128), mode="RGBA"), solid((4, 5, 6))], padding=1)
    assert rgba.mode == "RGBA"
    assert np.asarray(rgba)[0, 0, 3] == 0  # transparent background
    assert tuple(np.asarray(rgba)[1, 1]) == (1, 2, 3, 128)


def test_save_dir_writes_grid_and_images_and_never_overwrites(tmp_path):
    images = [solid((i * 40, 0, 0), (8 + i, 6)) for i in range(3)]
    out = tmp_path / "new" / "dir"
    grid = show(images, save_dir=out, prefix="cat", nrow=2)
    assert sorted(p.name for p in out.iterdir()) == ["cat_000.png", "cat_001.png", "cat_002.png", "grid.png"]
    for i, image in enumerate(images):
        with Image.open(out / f"cat_{i:03d}.png") as saved:
            assert saved.format == "PNG" and saved.size == image.size  # saved at its own size
            assert np.array_equal(np.asarray(saved), np.asarray(image))
    with Image.open(out / "grid.png") as saved:
        assert saved.format == "PNG" and np.array_equal(np.asarray(saved), np.asarray(grid))

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    (out / "cat_003.png").unlink(missing_ok=True)
    with pytest.raises(FileExistsError, match="grid.png"):
        show([solid((0, 255, 0))] * 4, save_dir=out, prefix="cat")
    assert not (out / "cat_003.png").exists()  # checked everything before writing anything
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before

    (out / "grid.png").unlink()
    with pytest.raises(FileExistsError, match="cat_000.png"):
        show(images, save_dir=out, prefix="cat")
    assert not (out / "grid.png").exists()

    show([solid((0, 255, 0))] * 3, save_dir=out, prefix="cat", overwrite=True)
    with Image.open(out / "cat_000.png") as saved:
        assert saved.getpixel((0, 0)) == (0, 255, 0)


def test_no_output_outside_a_notebook(capsys, tmp_path):
    grid = show([solid((1, 2, 3))])
    assert isinstance(grid, Image.Image)
    assert capsys.readouterr() == ("", "")


def _fake_ipython(monkeypatch, shell):
    shown = []
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    display = types.ModuleType("IPython.display")
    display.display = shown.append
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return shown


def test_displays_inline_in_a_kernel(monkeypatch, capsys):
    shown = _fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()))
    grid = show([solid((1, 2, 3)), solid((4, 5, 6))])
    assert shown == [grid]
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("shell", [None, types.SimpleNamespace()])  # plain python / terminal IPython
def test_no_display_without_a_kernel(monkeypatch, shell):
    shown = _fake_ipython(monkeypatch, shell)
    show([solid((1, 2, 3))])
    assert shown == []


def test_never_imports_ipython(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    show([solid((1, 2, 3))])
    assert "IPython" not in sys.modules


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        show([])
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray"):
        show([solid((0, 0, 0)), np.zeros((4, 4, 3))])
    with pytest.raises(TypeError, match="list of PIL images"):
        show(solid((0, 0, 0)))
    with pytest.raises(ValueError, match="nrow must be >= 1, got 0"):
        show([solid((0, 0, 0))], nrow=0)
    with pytest.raises(TypeError, match="nrow"):
        show([solid((0, 0, 0))], nrow=2.0)
    with pytest.raises(ValueError, match="size must be >= 1"):
        show([solid((0, 0, 0))], size=0)
    with pytest.raises(ValueError, match=r"images\[0\] has mode 'F'"):
        show([Image.new("F", (4, 4))])
    with pytest.raises(ValueError, match="prefix"):
        show([solid((0, 0, 0))], save_dir=tmp_path, prefix="a/b")
    assert list(tmp_path.iterdir()) == []


def _transparent_with_red_block():
    """16x16 RGBA: transparent, a red opaque block at rows/cols 4..11, one half-transparent pixel."""
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[4:12, 4:12] = (255, 0, 0, 255)
    pixels[0, 15] = (0, 0, 0, 128)
    return Image.fromarray(pixels)


def test_show_composites_rgba_onto_a_checkerboard_by_default(tmp_path):
    from rudalle_pipe.show import CHECKER_COLORS, CHECKER_SQUARE

    images = [_transparent_with_red_block(), _transparent_with_red_block()]
    grid = show(images, nrow=2, padding=0, save_dir=tmp_path)
    assert grid.mode == "RGB" and grid.size == (32, 16)
    pixels = np.asarray(grid)
    white, grey = CHECKER_COLORS
    assert tuple(pixels[0, 0]) == white and tuple(pixels[0, CHECKER_SQUARE]) == grey  # transparent spots
    assert tuple(pixels[12, 0]) == grey and tuple(pixels[12, 12]) == white  # row 12: second row of squares
    assert tuple(pixels[5, 5]) == (255, 0, 0) and tuple(pixels[5, 16 + 5]) == (255, 0, 0)  # opaque: unchanged
    assert all(abs(int(v) - 204 * 127 / 255) <= 1 for v in pixels[0, 15])  # half alpha over grey (x=15)
    with Image.open(tmp_path / "grid.png") as saved:
        assert saved.mode == "RGB" and np.array_equal(np.asarray(saved), pixels)
    with Image.open(tmp_path / "image_000.png") as saved:  # single images keep their alpha
        assert saved.mode == "RGBA" and np.array_equal(np.asarray(saved), np.asarray(images[0]))


@pytest.mark.parametrize("background, rgb", [("blue", (0, 0, 255)), ("#102030", (16, 32, 48)),
                                             ((7, 8, 9), (7, 8, 9))])
def test_rgba_grid_onto_a_chosen_colour(background, rgb):
    for grid in (show([_transparent_with_red_block()], background=background, padding=1),
                 image_grid([_transparent_with_red_block()], background=background, padding=1)):
        pixels = np.asarray(grid)
        assert grid.mode == "RGB"
        assert tuple(pixels[0, 0]) == rgb and tuple(pixels[1, 1]) == rgb  # padding and transparent cell
        assert tuple(pixels[1 + 5, 1 + 5]) == (255, 0, 0)


def test_background_none_keeps_transparency_and_rgb_grids_are_untouched(tmp_path):
    rgba = _transparent_with_red_block()
    kept = show([rgba], background=None, padding=0, save_dir=tmp_path)
    assert kept.mode == "RGBA" and np.array_equal(np.asarray(kept), np.asarray(rgba))
    with Image.open(tmp_path / "grid.png") as saved:
        assert saved.mode == "RGBA" and np.asarray(saved)[0, 0, 3] == 0
    assert image_grid([rgba]).mode == "RGBA"  # image_grid's default stays None
    for background in ("checkerboard", "red", (1, 2, 3)):
        plain = show([solid((9, 8, 7)), solid((1, 1, 1))], background=background, padding=1)
        assert plain.mode == "RGB" and tuple(np.asarray(plain)[0, 0]) == (0, 0, 0)  # black padding as before
        assert image_grid([solid(50, mode="L")], background=background).mode == "L"


def test_bad_background(tmp_path):
    rgba = [_transparent_with_red_block()]
    with pytest.raises(ValueError, match=r"background must be \"checkerboard\".*unknown colour 'chequer'"):
        show(rgba, background="chequer", save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"background\[2\] must be in \[0, 255\], got 256"):
        show(rgba, background=(0, 0, 256))
    with pytest.raises(TypeError, match=r"background\[0\] must be an int"):
        image_grid(rgba, background=(0.5, 0, 0))
    with pytest.raises(TypeError, match=r"background must be .*got \[0, 0, 0\] \(list\)"):
        show(rgba, background=[0, 0, 0])
    with pytest.raises(TypeError, match=r"background must be .*got 5 \(int\)"):
        image_grid(rgba, background=5)
    assert list(tmp_path.iterdir()) == []  # checked before anything was written
