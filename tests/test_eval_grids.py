"""Labelled PNG grids: valid PNG, expected size, tiles where the layout says."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diti_fast.grids import image_grid, save_grid, to_uint8

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_png_of_expected_size(tmp_path):
    R, C, S = 3, 5, 16
    imgs = torch.rand(R, C, 3, S, S) * 2 - 1
    path = save_grid(tmp_path / "g.png", imgs, [f"row {i}" for i in range(R)], [f"α={a}" for a in range(C)],
                     title="t", scale=4, pad=2, label_width=70, header_height=15, title_height=15)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = Image.open(io.BytesIO(data))
    img.verify()
    cell = S * 4
    assert Image.open(path).size == (70 + C * cell + (C + 1) * 2, 15 + 15 + R * cell + (R + 1) * 2)


def test_tiles_land_in_their_cells():
    R, C, S, scale, pad, lw, hh = 2, 3, 8, 2, 3, 40, 10
    imgs = np.zeros((R, C, S, S, 3), np.uint8)
    for r in range(R):
        for c in range(C):
            imgs[r, c] = (r * 100 + 10, c * 80 + 5, 200)
    g = np.asarray(image_grid(imgs, ["a", "b"], ["x", "y", "z"], scale=scale, pad=pad, label_width=lw,
                              header_height=hh, title_height=0))
    cell = S * scale
    for r in range(R):
        for c in range(C):
            y0, x0 = hh + pad + r * (cell + pad), lw + pad + c * (cell + pad)
            assert (g[y0:y0 + cell, x0:x0 + cell] == imgs[r, c, 0, 0]).all()


def test_default_labels_fit_and_small_images_are_scaled_up():
    img = image_grid(torch.zeros(1, 2, 3, 32, 32), ["a long row label"], ["c0", "c1"])
    w, h = img.size
    assert w > 2 * 64 and h > 64  # 32 px scaled to >= 64 px cells, plus a label column and header


def test_model_space_to_uint8_rounding():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 4).expand(3, 1, 4)  # C, H, W
    assert to_uint8(x)[0, :, 0].tolist() == [0, 128, 255, 255]


def test_label_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="row labels"):
        image_grid(torch.zeros(2, 2, 3, 8, 8), ["only one"])
