"""Overlap-tile prediction at full resolution, as in the U-Net paper (Ronneberger et al., 2015).

The image gets mirrored borders, is cut into tiles, the model predicts the tiles one batch at a time, and
the tile predictions are blended into a full-size probability map with a smooth window.  The blending
happens in a float32 band one tile row high, and each finished band is written into the result in the
requested dtype (float16 halves it), so memory is one batch of tiles, one band, the mirrored uint8 input
and the result: never the activations of the whole image, nor image-sized float32 sums.
``predict_tiled`` needs only NumPy and a predict callable; ``tile_geometry`` and ``predict_view`` fit it
to a U-Net of ``unet_model_core``.  What comes before and after the forward passes (preprocessing, the
nucleus scale, TTA, post-processing) is ``unet_nuclei.segmenter``'s: this module imports nothing of the
package.
"""

from __future__ import annotations

import math

import cv2
import keras
import numpy as np

from unet_model_core import Config, check_input_size, resize_image, unet_output_size


def tile_positions(length: int, output_size: int, overlap: int) -> list[int]:
    """Start offsets (in output coordinates) of tiles along one axis covering [0, length).

    The first tile starts at 0 and, when ``length >= output_size``, the last
    tile ends exactly at ``length`` so that no tile sticks out of the image.
    The tiles in between are spread evenly, which makes every overlap at least
    ``overlap`` pixels wide and every step at most ``output_size - overlap``.
    When the axis is shorter than one output tile a single tile at 0 is used;
    its surplus output is discarded by the caller.

    Args:
        length: Size of the axis to cover, in pixels (>= 1).
        output_size: Size of one output tile along the axis (>= 1).
        overlap: Minimum overlap between neighbouring tiles,
            ``0 <= overlap < output_size``.

    Returns:
        Sorted list of start offsets.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    if not 0 <= overlap < output_size:
        raise ValueError(f"overlap must satisfy 0 <= overlap < output_size ({output_size}), got {overlap}")
    if length <= output_size:
        return [0]
    step = output_size - overlap
    last = length - output_size
    n_tiles = -(-last // step) + 1  # Integer ceil(last / step).
    # Even spacing distributes the surplus overlap over all seams instead of
    # piling it onto the last tile.  The real spacing last / (n_tiles - 1) is
    # at most ``step``, and because ``step`` is an integer the differences of
    # the floored positions (floor or ceil of that spacing) never exceed it
    # either.  Integer arithmetic keeps the last position exact.
    return [i * last // (n_tiles - 1) for i in range(n_tiles)]


def blend_window(size) -> np.ndarray:
    """The 2-D float32 blending window (size x size, or height x width for a pair), >0 everywhere.

    The window is the outer product of 1-D Hann (raised cosine) windows
    sampled at pixel centres, so it is symmetric and peaks in the middle of
    the tile where a same-padding network is most reliable.  A floor of 1e-3
    keeps the border pixels strictly positive: where only one tile covers a
    pixel (the image border, or tiles without overlap) its prediction must
    still count after normalisation by the accumulated weights.

    Args:
        size: Side length of a square output tile, or its (height, width).

    Returns:
        Array of shape (size, size) or (height, width), dtype float32, all
        values in (0, 1].
    """
    height, width = (size, size) if np.ndim(size) == 0 else tuple(size)
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"size must be >= 1, got {size}")

    def hann(length):
        # Sampling at (i + 0.5) / length makes the window symmetric without
        # putting an exact zero on either end.
        centres = (np.arange(int(length), dtype=np.float64) + 0.5) / int(length)
        return np.maximum(0.5 - 0.5 * np.cos(2.0 * np.pi * centres), 1e-3)

    return np.outer(hann(height), hann(width)).astype(np.float32)


def _pair(value, name):
    """``(height, width)`` from an int or a pair of ``predict_tiled``'s argument ``name``."""
    if np.ndim(value) == 0:
        return int(value), int(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return int(value[0]), int(value[1])


def _tile_and_output_sizes(tile_size, output_size):
    """``(tile_h, tile_w, out_h, out_w)`` from ``predict_tiled``'s arguments; ValueError when the output
    tile is not a centred part of the input tile."""
    tile_h, tile_w = _pair(tile_size, "tile_size")
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    out_h, out_w = (tile_h, tile_w) if output_size is None else _pair(output_size, "output_size")
    if min(out_h, out_w) < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    if out_h > tile_h or out_w > tile_w:
        raise ValueError(f"output_size ({output_size}) must not exceed tile_size ({tile_size})")
    if (tile_h - out_h) % 2 or (tile_w - out_w) % 2:
        raise ValueError(
            f"tile_size - output_size must be even so the output is centred, "
            f"got tile_size={tile_size}, output_size={output_size}"
        )
    return tile_h, tile_w, out_h, out_w


def predict_tiled(
    predict_batch,
    image,
    tile_size,
    output_size=None,
    overlap=None,
    batch_size=8,
    progress=None,
    dtype=np.float32,
) -> np.ndarray:
    """Predict a full-size probability map with overlap-tile inference.

    The image is covered by output tiles of ``output_size`` pixels placed by
    :func:`tile_positions`.  Each output tile is predicted from an input tile
    of ``tile_size`` pixels centred on it; for a "valid" (unpadded) network
    the extra ``margin = (tile_size - output_size) // 2`` pixels on each side
    provide the context the network consumes.  Where an input tile leaves the
    image it is filled with the mirrored image, as in the U-Net paper.
    Overlapping output tiles are blended with :func:`blend_window` so that the
    less reliable tile borders of a same-padding network are down-weighted and
    no seams appear.  When one tile covers the whole image its prediction is
    returned as it is (there is nothing to blend).

    Args:
        predict_batch: Callable mapping a float32 array of shape
            (n, tile_h, tile_w, C) to probabilities of shape
            (n, output_h, output_w, K), e.g. a wrapped ``model.predict``.  The
            array it is given is reused for the next batch: copy it to keep it.
        image: Image of shape (H, W, C), any real dtype (uint8 stays uint8 in
            memory, mirrored borders included; each tile is converted to
            float32 as it is cut).
        tile_size: Side length of the network input tiles, or their
            (height, width).
        output_size: Side length (or (height, width)) of the network output
            tiles; ``None`` means ``tile_size`` (same-padding network).
            ``tile_size - output_size`` must be even and non-negative.
        overlap: Overlap in pixels between neighbouring output tiles (an int,
            or one per axis).  ``None`` means ``output_size // 4`` for a
            same-padding network and 0 for a valid network, whose outputs have
            no border effect.
        batch_size: Maximum number of tiles passed to ``predict_batch`` at once.
        progress: Optional callable ``progress(done_tiles, total_tiles)``
            invoked after each batch.
        dtype: Floating dtype of the result.  The blending is done in
            float32 either way; float16 stores the result in half the memory
            (probabilities then carry about 3 significant digits).

    Returns:
        Array of shape (H, W, K) and ``dtype`` with the blended probabilities.

    Raises:
        ValueError: On a malformed image, inconsistent sizes, or a
            ``predict_batch`` result of unexpected shape.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3-D array of shape (H, W, C), got shape {image.shape}")
    if image.dtype.kind not in "biuf":
        image = image.astype(np.float32)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype such as float32 or float16, got {dtype}")
    height, width, channels = image.shape
    if height < 1 or width < 1 or channels < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")

    tile_h, tile_w, out_h, out_w = _tile_and_output_sizes(tile_size, output_size)
    margin_h, margin_w = (tile_h - out_h) // 2, (tile_w - out_w) // 2

    if overlap is None:
        overlap = (out_h // 4, out_w // 4) if margin_h == margin_w == 0 else 0
    overlap_h, overlap_w = _pair(overlap, "overlap")
    if not (0 <= overlap_h < out_h and 0 <= overlap_w < out_w):
        raise ValueError(f"overlap must satisfy 0 <= overlap < output_size ({output_size}), got {overlap}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    tops = tile_positions(height, out_h, overlap_h)
    lefts = tile_positions(width, out_w, overlap_w)
    tiles = [(top, left) for top in tops for left in lefts]
    total = len(tiles)
    # Mirror the image once, in its own dtype, far enough for every input tile: each tile is then a plain
    # slice.  np.pad repeats the reflection when the pad is wider than the image, and a 1-pixel-wide axis
    # (which cannot be reflected) repeats its pixel.
    padded = np.pad(
        image,
        (
            (margin_h, max(0, tops[-1] + tile_h - margin_h - height)),
            (margin_w, max(0, lefts[-1] + tile_w - margin_w - width)),
            (0, 0),
        ),
        mode="reflect",
    )

    # One float32 batch buffer for the whole image, filled in place.  The result and the float32 band
    # are allocated once the number of classes K is known from the first batch.
    buffer = np.empty((min(batch_size, total), tile_h, tile_w, channels), dtype=np.float32)
    result = band = band_weights = window = None
    classes = None
    # The band holds the weighted sums of the image rows [band_top, band_top + out_h).  Tiles arrive in
    # row-major order, so when a tile starting at row ``top`` arrives, no later tile touches the rows
    # above ``top``: those rows are final, are normalised into the result and leave the band.  Every
    # tile therefore lands at the top of the band, and the band never needs to be taller than one tile.
    band_top = 0

    def finish_rows(until):
        nonlocal band_top
        done = until - band_top
        # Every pixel is covered by at least one tile with a strictly positive weight, so the division is
        # safe.  It is computed in float32 and only its result is cast to ``dtype``.
        np.divide(band[:done], band_weights[:done, :, None], out=result[band_top:until], casting="unsafe")
        band[: -done or None] = band[done:]
        band_weights[: -done or None] = band_weights[done:]
        band[-done:] = 0
        band_weights[-done:] = 0
        band_top = until

    for first in range(0, total, batch_size):
        chunk = tiles[first : first + batch_size]
        batch = buffer[: len(chunk)]
        for slot, (top, left) in enumerate(chunk):
            # In the padded image the input tile starts ``margin`` pixels before its output tile, so
            # that the valid network's output lands on the output tile.
            batch[slot] = padded[top : top + tile_h, left : left + tile_w]

        answer = np.asarray(predict_batch(batch))
        if (
            answer.ndim != 4
            or answer.shape[:3] != (len(chunk), out_h, out_w)
            or (classes is not None and answer.shape[3] != classes)
        ):
            k_text = "K" if classes is None else str(classes)
            raise ValueError(
                f"predict_batch returned shape {answer.shape} for an input of shape "
                f"{batch.shape}; expected ({len(chunk)}, {out_h}, {out_w}, {k_text})"
            )
        classes = answer.shape[3]

        if total == 1:
            # The tile covers the image: cropping its surplus is all there is to do.
            result = np.array(answer[0, :height, :width], dtype=dtype)
        else:
            if result is None:
                result = np.empty((height, width, classes), dtype=dtype)
                band = np.zeros((min(out_h, height), width, classes), dtype=np.float32)
                band_weights = np.zeros(band.shape[:2], dtype=np.float32)
                window = blend_window((out_h, out_w))
            for slot, (top, left) in enumerate(chunk):
                if top > band_top:
                    finish_rows(top)
                # Output tiles can only extend past the image when the image is
                # smaller than one tile; that surplus is cropped away here.
                rows = min(out_h, height - top)
                cols = min(out_w, width - left)
                tile_weight = window[:rows, :cols]
                band[:rows, left : left + cols] += (
                    answer[slot, :rows, :cols].astype(np.float32, copy=False) * tile_weight[:, :, None]
                )
                band_weights[:rows, left : left + cols] += tile_weight

        if progress is not None:
            progress(first + len(chunk), total)

    if total > 1:
        finish_rows(height)
    return result


PREDICT_TILE = 1536  # largest tile side for padded models: an image up to 1504 px a side is one forward pass;
# with the default channels such a tile takes about 1 GB of activations (wider models get smaller tiles)
TILED_TILE = 512  # largest tile side, and pixels per forward pass (squared), once an image needs several
# tiles: TensorFlow then holds about 150 MB for the forward passes with the default channels (430 MB with
# 1024-px tiles, 1 GB with 1536), for about 7% more tile area and 3-4% more time on a 3000x3000 image
# (measured here; benchmarks/bench_predict_memory.py measures the whole prediction)
CONTEXT_MARGIN = 16  # pixels of (mirrored) context cut from each side of a padded model's tile output


def tile_geometry(
    model: keras.Model, config: Config, image_shape: tuple[int, int], tile_size: int | None = None
) -> tuple:
    """``(tile_size, output_size, margin)`` for predicting an image of ``image_shape`` with ``model``.

    Unpadded models use their fixed input size and give the centre of each tile.  Padded models take any
    multiple of 2**depth on each side, and ``margin`` pixels of each tile's border (where zero padding
    blurs the output) are cut so every kept pixel had real or mirrored context.  With ``tile_size`` the
    tiles are squares of that side (shrunk for small images).  By default they are shaped to the image:
    along each axis the fewest tiles of at most ``PREDICT_TILE`` pixels, each as small as covers the
    image, so that the forward passes spend little on padding (a 520x696 image is one 560x736 tile, not
    a 736x736 square).  An image that needs several tiles gets tiles of at most ``TILED_TILE`` pixels,
    so that the memory of one forward pass stays small whatever the image size.  Sizes are ints for
    square tiles and (height, width) pairs otherwise."""
    fixed = model.input_shape[1]
    if config.padding == "valid" or fixed is not None:
        size = fixed or config.image_size
        return size, unet_output_size(size, config.depth, config.padding), 0
    step = 2**config.depth
    margin = CONTEXT_MARGIN
    needed = [int(math.ceil((length + 2 * margin) / step)) * step for length in image_shape]
    if tile_size is not None:
        check_tile_size(config, tile_size)
        size = max(step, min(tile_size, max(needed)))
        check_input_size(size, config.depth, "same")
        margin = min(margin, (size - step) // 2) if size - 2 * margin < step else margin
        return size, size - 2 * margin, margin

    # Activations grow with the first level's channels: a wider model gets proportionally smaller tiles.
    def largest_side(side):
        return max(int(side * math.sqrt(min(1.0, 16 / config.channels[0]))) // step * step, 2 * margin + step)

    largest = largest_side(PREDICT_TILE)
    if max(needed) > largest:
        largest = largest_side(TILED_TILE)
    sides = []
    for length in image_shape:
        # The cheapest side along this axis: fewest input pixels (tiles x side) with the default overlap;
        # one tile as small as covers the axis whenever it fits.
        best = None
        for side in range(largest, 2 * margin, -step):
            out = side - 2 * margin
            cost = len(tile_positions(length, out, out // 8)) * side
            if best is None or cost < best[0]:
                best = (cost, side)
        sides.append(best[1])
    for side in sides:
        check_input_size(side, config.depth, "same")
    if sides[0] == sides[1]:
        return sides[0], sides[0] - 2 * margin, margin
    return tuple(sides), (sides[0] - 2 * margin, sides[1] - 2 * margin), margin


def smallest_tile(config: Config) -> int:
    """The smallest ``--tile-size`` that gives a padded model the context it learned with: its training
    patch (a smaller tile shows each pixel less of its surroundings than the model ever saw, and the masks
    fall apart into fragments), and never less than the mirrored margins plus one pooling window."""
    step = 2**config.depth
    return max(int(math.ceil(config.image_size / step)) * step, 2 * CONTEXT_MARGIN + step)


def check_tile_size(config: Config, tile_size: int | None) -> None:
    """ValueError, naming ``--tile-size`` and the sizes that work, for a tile side this model cannot use."""
    if tile_size is None or config.padding == "valid" or config.sampling == "resize":
        return  # those models predict at their own fixed size; the flag does not apply
    step, smallest = 2**config.depth, smallest_tile(config)
    if int(tile_size) != tile_size or tile_size < smallest or tile_size % step:
        raise ValueError(
            f"--tile-size {tile_size}: this model needs a multiple of {step} of at least "
            f"{smallest} px (its training patch, so every pixel keeps the context it learned "
            f"with); for example --tile-size {smallest}, or leave the flag out"
        )


def predict_view(
    model: keras.Model,
    image: np.ndarray,
    config: Config,
    tile_size: int | None = None,
    batch_size: int = 4,
    overlap: int | None = None,
    progress=None,
    dtype=np.float32,
) -> np.ndarray:
    """The class probabilities (H x W x K, ``dtype``) of an image already preprocessed as in training
    (``unet_model_core.preprocess_image``), in one orientation, at its own scale.

    Models trained on resized images predict on the image resized the same way (and the result is resized
    back); patch-trained models predict at full resolution by overlap-tile (``tile_geometry`` says how).
    ``batch_size`` tiles go through the model at once, but never more than ``TILED_TILE ** 2`` input
    pixels (or the one tile of an image that fits one), so memory stays bounded whatever the tile size.
    ``overlap`` None: the run's ``tile_overlap``, else an eighth of a tile."""
    height, width = image.shape[:2]
    if config.sampling == "resize":
        # An unpadded model's output covers only the centre of its input: resize the image to the output
        # size and give it mirrored borders, so the output covers the whole image.
        out_size = unet_output_size(config.image_size, config.depth, config.padding)
        margin = (config.image_size - out_size) // 2
        small = resize_image(image, out_size).reshape(out_size, out_size, -1)
        small = np.pad(small, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
        out = np.asarray(model.predict_on_batch(small.astype(np.float32)[None]))[0]
        out = cv2.resize(out.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return out.reshape(height, width, -1).astype(dtype, copy=False)
    size, out_size, margin = tile_geometry(model, config, (height, width), tile_size)
    tile_h, tile_w = (size, size) if np.ndim(size) == 0 else size
    out_h, out_w = (out_size, out_size) if np.ndim(out_size) == 0 else out_size

    def predict_batch(tiles):
        output = np.asarray(model.predict_on_batch(tiles))
        if margin:
            output = output[:, margin : tile_h - margin, margin : tile_w - margin]
        return output

    if overlap is None:
        overlap = config.tile_overlap if config.tile_overlap is not None else (min(out_h, out_w) // 8 if margin else 0)
    # An image of one tile is one forward pass whatever its size; several tiles go TILED_TILE**2 pixels
    # at a time at most.
    budget = TILED_TILE**2 * min(1.0, 16 / config.channels[0])
    batch_size = max(1, min(int(batch_size), int(budget // (tile_h * tile_w))))
    # The image goes in as it is (uint8): predict_tiled converts one tile at a time, so no float32 copy
    # of a large image is ever made.
    return predict_tiled(
        predict_batch, image, size, out_size, min(overlap, out_h - 1, out_w - 1), batch_size, progress, dtype
    )
