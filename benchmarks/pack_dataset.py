"""Pack a dataset folder into a compact copy: ``<out>/images/<id>.png`` + ``<out>/masks/<id>.png``.

The masks are 16-bit instance-label PNGs (one value per nucleus), which the loader reads as the "pairs"
layout with touching nuclei kept apart, so the copy trains and scores exactly like the original: the
decoded arrays are identical (checked after writing).  DSB-2018's stage1_train (187 MB on disk, about
29,000 mask files) packs into about 50 MB in 1,328 files, small enough to carry to a lent GPU machine.

    python benchmarks/pack_dataset.py dataset/stage1_train dataset/packed_stage1_train

Grey images (all three channels equal) are written with one channel.  The output folder must not exist.
Never commit the packed copy: it is made from the data (``dataset/`` is git-ignored).
"""

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _write_one(sample, images_dir: Path, masks_dir: Path, level: int) -> int:
    import cv2
    import numpy as np

    image = np.ascontiguousarray(sample.image)
    if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
        encoded_image = cv2.imencode(".png", np.ascontiguousarray(image[..., 0]), [cv2.IMWRITE_PNG_COMPRESSION, level])[
            1
        ]
    else:
        encoded_image = cv2.imencode(
            ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level]
        )[1]
    encoded_labels = cv2.imencode(
        ".png", np.ascontiguousarray(sample.labels, dtype=np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, level]
    )[1]
    encoded_image.tofile(str(images_dir / f"{sample.sample_id}.png"))
    encoded_labels.tofile(str(masks_dir / f"{sample.sample_id}.png"))
    return encoded_image.size + encoded_labels.size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Pack a dataset folder (any layout the loader reads) into "
        "images/ + 16-bit label masks/ PNGs, decoded-identical."
    )
    parser.add_argument("data", help="dataset folder, e.g. dataset/stage1_train")
    parser.add_argument("out", help="new output folder (must not exist)")
    parser.add_argument(
        "--level", type=int, default=6, choices=range(10), metavar="0-9", help="PNG compression level (default 6)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; give a new folder", file=sys.stderr)
        return 2
    import numpy as np

    import unet_model_core as core
    from unet_nuclei import cache

    started = time.time()
    try:
        loaded, problems, how = cache.load_folder(args.data)
    except core.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cache.report_problems(problems)
    print(f"{args.data}: {len(loaded)} samples, {how}", file=sys.stderr)
    staging = out.with_name(out.name + ".partial")
    (staging / "images").mkdir(parents=True, exist_ok=True)
    (staging / "masks").mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(lambda s: _write_one(s, staging / "images", staging / "masks", args.level), loaded))
    # Check the promise before handing the copy over: every decoded array identical to the original.
    copies = {s.sample_id: s for s in core.load_samples(core.find_samples(staging)[0], progress=False)[0]}
    different = [
        s.sample_id
        for s in loaded
        if s.sample_id not in copies
        or not np.array_equal(copies[s.sample_id].image, s.image)
        or not np.array_equal(copies[s.sample_id].labels, s.labels)
    ]
    if different:
        print(
            f"error: {len(different)} samples decode differently from the original (first: {different[0]}); "
            f"the partial copy is in {staging}",
            file=sys.stderr,
        )
        return 1
    staging.rename(out)
    figures = {"samples": len(loaded), "mb": round(sum(sizes) / 2**20, 1), "seconds": round(time.time() - started, 1)}
    print(f"Packed {len(loaded)} samples into {out} ({figures['mb']} MiB)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
