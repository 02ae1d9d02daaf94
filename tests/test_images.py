"""Single-image helpers: the one uint8 resize (float, rounded), short sides and squares, crops and
normalisation by hand, decode errors that name the image, and no warning filters changed by
importing the pipeline."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from PIL import Image

from itl_ray.errors import UserError
from itl_ray.images import (MEAN, STD, center_crops, center_square, decode_rgb, load_squares, normalize,
                            normalize_, random_crops, resize_short_side, resize_uint8, short_side_for)


def png(pixels: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out.getvalue()


def test_resize_is_antialiased_bilinear_rounded_to_the_nearest_level():
    # Halving a row: the filter is a triangle twice as wide, so output pixel 0 (centre 1.0 in input
    # coordinates) weighs inputs 0, 1, 2 by 0.75, 0.75, 0.25, normalised: 40.75 / 1.75 = 23.29 -> 23;
    # pixel 1 weighs inputs 1, 2, 3 by 0.25, 0.75, 0.75: 153.5 / 1.75 = 87.71 -> 88 (not cut to 87).
    image = torch.tensor([[[10, 11, 100, 101]]], dtype=torch.uint8).expand(3, 1, 4)
    assert resize_uint8(image, 1, 2)[0].tolist() == [[23, 88]]
    constant = torch.full((3, 37, 53), 201, dtype=torch.uint8)
    assert torch.equal(resize_uint8(constant, 64, 20), torch.full((3, 64, 20), 201, dtype=torch.uint8))


def test_short_side_and_center_square():
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    resized = resize_short_side(image, 73)
    assert resized.shape == (3, 73, 110)  # 150 * 0.73 = 109.5 rounds to 110
    assert resize_short_side(image.transpose(1, 2), 73).shape == (3, 110, 73)
    square = center_square(resized, 73)
    assert torch.equal(square, resized[:, :, 18:91])
    assert [short_side_for(resolution) for resolution in (227, 224, 64, 48)] == [256, 253, 72, 54]  # Caffe's 256/227


def test_load_squares_decodes_resizes_and_squares():
    images = [torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8), torch.randint(0, 256, (3, 80, 55),
                                                                                       dtype=torch.uint8)]
    squares = load_squares([png(image) for image in images], 55)
    assert squares.shape == (2, 3, 55, 55) and squares.dtype == torch.uint8
    for square, image in zip(squares, images):
        assert torch.equal(square, center_square(resize_short_side(image, 55), 55))


def test_crops_and_normalisation():
    batch = torch.arange(2 * 3 * 6 * 8, dtype=torch.int64).reshape(2, 3, 6, 8).to(torch.uint8)
    assert torch.equal(center_crops(batch, 4), batch[:, :, 1:5, 2:6])
    crops = random_crops(batch, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 4, 4)
    for crop, image in zip(crops, batch):  # each crop is a window of its image, flipped or not
        windows = [image[:, top : top + 4, left : left + 4] for top in range(3) for left in range(5)]
        assert any(torch.equal(crop, window) or torch.equal(crop, window.flip(-1)) for window in windows)
    expected = (batch.float() / 255 - MEAN) / STD
    assert torch.allclose(normalize(batch), expected, atol=1e-6)
    assert torch.allclose(normalize_(batch.float()), expected, atol=1e-5)


def test_an_undecodable_image_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"cannot decode image 000042 \(.*\); prepare its dataset again"):
        decode_rgb(b"\xff\xd8 not really a JPEG", "000042")
    pixels = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(decode_rgb(png(pixels), "ok"), pixels)


def test_importing_the_pipeline_changes_no_warning_filter():
    code = ("import warnings, numpy, pyarrow, PIL, torch, torchvision\n"
            "before = list(warnings.filters)\n"
            "import itl_ray.images, itl_ray.image_rows, itl_ray.crop_plans, itl_ray.resample, itl_ray.fast_loader\n"
            "import itl_ray.torchvision_loader, itl_ray.pretrain, itl_ray.trial, itl_ray.bench\n"
            "print(warnings.filters == before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
