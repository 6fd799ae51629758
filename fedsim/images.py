"""Images for people: tensors in [0, 1] to PNG grids and GIF animations, as bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

MIN_SIDE = 192  # pixels per image tile: readable on a projector at the back of a classroom


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One image [C, H, W] in [0, 1] as a PIL image, enlarged `scale` times without smoothing."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    pil = Image.fromarray(array)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def grid(images: torch.Tensor, columns: int | None = None, scale: int | None = None, pad: int = 2) -> Image.Image:
    """A batch [B, C, H, W] as one image; small images are enlarged (nearest neighbour, whole multiples) to at
    least MIN_SIDE pixels a side, so that every pixel stays a crisp square."""
    b, c, h, w = images.shape
    columns = columns or min(b, 8)
    rows = math.ceil(b / columns)
    scale = scale or max(1, math.ceil(MIN_SIDE / min(h, w)))
    tiles = [to_pil(img, scale) for img in images]
    th, tw = h * scale, w * scale
    canvas = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, col = divmod(i, columns)
        canvas.paste(tile.convert("RGB"), (pad + col * (tw + pad), pad + r * (th + pad)))
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes(frames: list[torch.Tensor], duration_ms: int = 120, columns: int | None = None) -> bytes:
    """An animation of batches [B, C, H, W] (e.g. a reconstruction emerging over the iterations)."""
    pictures = [grid(frame, columns) for frame in frames]
    buffer = io.BytesIO()
    durations = [duration_ms] * (len(pictures) - 1) + [duration_ms * 10]  # rest on the final frame
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return buffer.getvalue()


def enlarged_gif(data: bytes, min_side: int = MIN_SIDE) -> bytes:
    """A GIF animation with frames of at least `min_side` pixels a side (nearest neighbour, whole multiples);
    one that is already large enough comes back as it was."""
    from PIL import ImageSequence

    with Image.open(io.BytesIO(data)) as gif:
        scale = math.ceil(min_side / max(1, min(gif.size)))
        if scale <= 1:
            return data
        size = (gif.width * scale, gif.height * scale)
        frames = [frame.convert("RGB").resize(size, Image.NEAREST) for frame in ImageSequence.Iterator(gif)]
        durations = [frame.info.get("duration", 120) for frame in ImageSequence.Iterator(gif)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()
