"""Writing outputs safely: every file whole or not at all, and filesystem errors as plain sentences.

Each writer here writes to a hidden temporary file in the target's own folder and renames it into place
(``os.replace`` is atomic on one filesystem), so an interruption, a full disk or a crash never leaves a
half-written file under the real name, and a failed write removes its temporary file.  A filesystem
error comes back as ``OutputError``: an ``OSError`` whose message names the file, its folder, the cause
and what to do, so the scripts print it instead of a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np


class OutputError(OSError):
    """A file could not be written (full disk, no permission, missing folder); the message says which
    file, in which folder, why, and what to do."""

    def __str__(self):
        return self.strerror or super().__str__()


_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or write to another folder",
    errno.EDQUOT: "the disk quota is used up; free some space or write to another folder",
    errno.EACCES: "no permission to write there; choose a folder you can write to",
    errno.EPERM: "no permission to write there; choose a folder you can write to",
    errno.EROFS: "the filesystem is read-only; choose a folder you can write to",
    errno.ENOENT: "the folder does not exist; create it or choose another one",
}


def describe(error: OSError, path) -> str:
    """One sentence for a failed write of ``path``: the file, its folder, the cause and what to do."""
    path = Path(path)
    cause = _ADVICE.get(error.errno, error.strerror or str(error))
    return f"could not write {path.name} in {path.parent}/: {cause} ({error.strerror or error})"


def _temporary(path: Path) -> Path:
    # Hidden, beside the target (so the rename stays on one filesystem), and keeping the suffix, which
    # Keras and Matplotlib read to choose the format.
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def refuse_existing(paths: Iterable, overwrite: bool = False) -> None:
    """Raise FileExistsError naming the first of ``paths`` that exists, unless ``overwrite`` is set: the
    output contract's "never replaced without --overwrite", checked before any work where callers can."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def replacing(path, overwrite: bool = True):
    """Yield a temporary path to write ``path``'s new content to; on success it is renamed to ``path``,
    on any failure it is removed and an ``OSError`` becomes ``OutputError``.  With ``overwrite`` off an
    existing ``path`` is refused (FileExistsError) before anything is written."""
    path = Path(path)
    refuse_existing([path], overwrite)
    temporary = _temporary(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, (OutputError, FileExistsError)):
            raise
        raise OutputError(error.errno, describe(error, path)) from error
    except BaseException:
        # An interrupt or any other failure mid-write: the temporary file goes, the target is untouched.
        temporary.unlink(missing_ok=True)
        raise


def _write(handle, data: bytes) -> None:
    # The one place bytes reach the disk, so the tests can stage a full disk here.
    handle.write(data)


def write_bytes(path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all."""
    with replacing(path, overwrite) as temporary, open(temporary, "wb") as handle:
        _write(handle, bytes(data))
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def write_text(path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    return write_bytes(path, text.encode("utf-8"), overwrite)


def write_csv(path, rows: Iterable[Iterable], overwrite: bool = True) -> Path:
    """Write ``rows`` as a CSV file, whole or not at all."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return write_text(path, buffer.getvalue(), overwrite)


def write_png(path, image: np.ndarray, overwrite: bool = True) -> Path:
    """Write an image as a PNG (RGB converted to OpenCV's BGR), whole or not at all."""
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", data)
    if not ok:
        raise OutputError(errno.EINVAL, f"could not encode {Path(path).name} as a PNG")
    return write_bytes(path, encoded.tobytes(), overwrite)


def write_tiff(
    path, image: np.ndarray, overwrite: bool = True, axes: str | None = None, pixel_size: float | None = None
) -> Path:
    """Write an image or a stack as a TIFF that Fiji and napari open as it is, whole or not at all.

    8- and 16-bit data (8-bit RGB too) become ImageJ TIFFs: ``axes`` names the dimensions in ImageJ's
    letters ("ZYX" for a z-stack, "TZYX", "ZYXS" for a stack of RGB images; ImageJ's default without
    it), and ``pixel_size`` (micrometres per pixel) goes into the resolution tags in micrometres.  Other
    types (32-bit labels, which ImageJ's format cannot hold) become plain TIFFs, the pixel size in
    pixels per centimetre, the finest unit plain TIFF has."""
    import tifffile  # only when a TIFF is asked for

    image = np.asarray(image)

    def write(temporary: Path) -> None:
        options: dict = {}
        if image.dtype in (np.uint8, np.uint16):
            metadata = {"axes": axes} if axes else {}
            if pixel_size is not None:
                options["resolution"] = (1 / pixel_size, 1 / pixel_size)
                metadata["unit"] = "um"
            options.update(imagej=True, metadata=metadata)
            if axes and axes.endswith("S"):
                options["photometric"] = "rgb"
        elif pixel_size is not None:
            options.update(resolution=(1e4 / pixel_size, 1e4 / pixel_size), resolutionunit="CENTIMETER")
        tifffile.imwrite(temporary, image, **options)

    return write_with(path, write, overwrite)


def write_with(path, save: Callable[[Path], object], overwrite: bool = True) -> Path:
    """Let ``save(temporary_path)`` write the file (``model.save``, ``figure.savefig``), then rename it
    into place; whole or not at all."""
    with replacing(path, overwrite) as temporary:
        save(temporary)
    return Path(path)


def check_writable(folder, what: str, create: bool = True) -> Path:
    """Make sure ``folder`` exists (created when ``create``) and a file can be written in it, before any
    long work; ``what`` names the flag or role in the message (for example ``"--out"``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            errno.ENOTDIR,
            f"{what} {folder}: this is a file, not a folder; give a folder for the outputs (a new one is created)",
        )
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise OutputError(
                errno.ENOENT, f"{what}: the folder {folder}/ does not exist; create it or choose another path"
            )
        probe = _temporary(folder / "write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except OutputError:
        raise
    except (FileExistsError, NotADirectoryError) as error:  # a file where a folder of the path should be
        raise OutputError(
            errno.ENOTDIR,
            f"{what}: cannot create {folder}/: part of that path is a file, not a folder ({error.strerror or error})",
        ) from error
    except OSError as error:
        cause = _ADVICE.get(error.errno, error.strerror or str(error))
        raise OutputError(
            error.errno, f"{what}: cannot write in {folder}/: {cause} ({error.strerror or error})"
        ) from error
    return folder
