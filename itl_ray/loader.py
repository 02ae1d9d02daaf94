"""The input pipeline: decode images once into uint8 tensors, then crop, flip and normalise in batches.

Images arrive as encoded bytes read from prepared shards (``itl_ray.shards``). They are decoded
with torchvision.io (RGB JPEG; PNG, grayscale and CMYK also work) and resized so their shorter
side is ``resize`` pixels, then center-cropped to a square of that side, and kept in memory as one
uint8 tensor; training batches take random crops with flips from it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from itl_ray.errors import UserError

# torchvision 0.29 announces that its image decoders move to torchcodec; they still work here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

# ImageNet's channel means and standard deviations (the usual torchvision values, in 0..1 units).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def decode_rgb(data: bytes, name: str) -> torch.Tensor:
    """One encoded image as a uint8 tensor 3xHxW; ``name`` names it in errors."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot decode image {name} ({error}); prepare its dataset again") from None


def resize_short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 3xHxW image so its shorter side is ``size`` (antialiased bilinear)."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(image[None].float(), size=new_size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def load_squares(images: list[bytes], size: int) -> torch.Tensor:
    """Decode images, resize the shorter side to ``size`` and center-crop: uint8 Nx3xSxS."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for index, data in enumerate(images):
        out[index] = center_square(resize_short_side(decode_rgb(data, f"#{index}"), size), size)
    return out


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 Nx3xHxW -> float, ImageNet-normalised."""
    return (batch.float() / 255.0 - MEAN.to(batch.device)) / STD.to(batch.device)


def random_crops(batch: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window and a random horizontal flip per image (uint8 in, uint8 out)."""
    count, _, height, width = batch.shape
    tops = torch.randint(0, height - crop + 1, (count,), generator=generator)
    lefts = torch.randint(0, width - crop + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    out = torch.empty((count, 3, crop, crop), dtype=batch.dtype)
    for index in range(count):
        window = batch[index, :, tops[index] : tops[index] + crop, lefts[index] : lefts[index] + crop]
        out[index] = window.flip(-1) if flips[index] else window
    return out


def center_crops(batch: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = batch.shape[-2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    return batch[:, :, top : top + crop, left : left + crop]
