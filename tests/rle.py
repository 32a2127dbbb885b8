"""DSB-2018 run-length encoding of one mask and its strict decoder: the reference the tests check
``unet_nuclei.formats.rle_rows`` (the encoder the project writes submissions with) against."""

import numpy as np


def rle_encode(mask) -> str:
    """DSB-2018 run-length encoding of one binary mask (any nonzero = foreground).

    Pixels are numbered from 1, top to bottom and then left to right (column-major, the Fortran order of
    the array), and the output is ``"start length start length ..."``.  An empty mask gives ``""``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    pixels = (mask != 0).ravel(order="F").astype(np.int8)
    # Padding with a background pixel on both sides makes every run start and end with a change.
    changes = np.flatnonzero(np.diff(np.concatenate(([0], pixels, [0])))) + 1
    runs = changes.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]
    return " ".join(map(str, runs.ravel().tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a DSB-2018 run-length string into a uint8 0/1 mask of shape (height, width).

    The inverse of ``rle_encode``.  An empty (or all-whitespace) string gives an empty mask.  Raises
    ValueError if the string holds anything but non-negative integers, an odd number of them, a start
    below 1, a length below 1, a run past the last pixel, or runs that are unsorted or overlap (the
    competition format forbids both).
    """
    if not isinstance(rle, str):
        raise TypeError(f"rle must be a string (use '' for an empty mask), got {type(rle).__name__}")
    try:
        height, width = (int(v) for v in shape)
        exact = all(int(v) == v for v in shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"shape must be (height, width), got {shape!r}") from error
    if not exact or height <= 0 or width <= 0:
        raise ValueError(f"shape must be two positive integers (height, width), got {shape!r}")
    n_pixels = height * width
    tokens = rle.split()
    bad = [token for token in tokens if not (token.isascii() and token.isdigit())]
    if bad:
        raise ValueError(f"run-length string must contain only non-negative integers, found {bad[0]!r}")
    if len(tokens) % 2:
        raise ValueError(f"run-length string must hold start/length pairs, got an odd count ({len(tokens)})")
    mask = np.zeros(n_pixels, np.uint8)
    if tokens:
        values = np.array([int(token) for token in tokens], dtype=np.int64).reshape(-1, 2)
        starts, lengths = values[:, 0], values[:, 1]
        ends = starts + lengths - 1  # The last pixel of each run, 1-based.
        if np.any(starts < 1):
            raise ValueError("run starts must be >= 1 (pixels are numbered from 1)")
        if np.any(lengths < 1):
            raise ValueError("run lengths must be >= 1")
        if np.any(ends > n_pixels):
            run = int(np.argmax(ends > n_pixels))
            raise ValueError(
                f"run {int(starts[run])} {int(lengths[run])} goes past the last pixel ({n_pixels} = {height} x {width})"
            )
        if np.any(starts[1:] <= ends[:-1]):
            raise ValueError("runs must be sorted by start and must not overlap")
        # Marking +1 at each start and -1 after each end, then summing, fills the runs without a loop.
        steps = np.zeros(n_pixels + 1, np.int64)
        steps[starts - 1] += 1
        steps[ends] -= 1
        mask = (np.cumsum(steps[:-1]) > 0).astype(np.uint8)
    return mask.reshape((height, width), order="F")
