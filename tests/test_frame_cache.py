"""The decoded-frame cache: exactly what the readers return, decoded once, never stale."""

import os
import shutil

import numpy as np

from angiotune.data.frame_cache import FrameCache
from angiotune.data.readers import read_frame, read_mask
from angiotune.data.stream import SampleSettings, load_rows, prepare_sample


def _first_row(phantom_index):
    rows, root = load_rows(phantom_index.out, "train")
    return rows.iloc[0].to_dict(), root


def test_cached_frames_and_masks_equal_the_decoded_ones_and_are_read_from_disk(phantom_index,
                                                                              tmp_path):
    row, root = _first_row(phantom_index)
    cine, mask = root / row["image_path"], root / row["mask_path"]
    cache = FrameCache(tmp_path / "frames")
    index = int(row["frame_index"])
    first = cache.frame(cine, index)
    assert np.array_equal(first, read_frame(cine, index))
    assert len(list((tmp_path / "frames").rglob("*.npy"))) == 1
    again = cache.frame(cine, index)
    assert isinstance(again, np.memmap) and np.array_equal(again, first)
    assert np.array_equal(cache.mask(mask), read_mask(mask))
    other = (index + 1) % phantom_index.index["frames"].iloc[0]
    assert np.array_equal(cache.frame(cine, other), read_frame(cine, other))
    assert len(list((tmp_path / "frames").rglob("*.npy"))) == 3


def test_a_changed_or_torn_file_is_decoded_again(phantom_index, tmp_path):
    row, root = _first_row(phantom_index)
    mask = tmp_path / "mask.png"
    shutil.copy(root / row["mask_path"], mask)
    cache = FrameCache(tmp_path / "frames")
    before = np.array(cache.mask(mask))
    from PIL import Image

    flipped = before[::-1].astype(np.uint8) * 255
    Image.fromarray(flipped).save(mask)
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later modification
    assert np.array_equal(cache.mask(mask), read_mask(mask))
    assert not np.array_equal(cache.mask(mask), before)
    for stored in (tmp_path / "frames").rglob("*.npy"):
        stored.write_bytes(stored.read_bytes()[:60])  # torn
    assert np.array_equal(cache.mask(mask), read_mask(mask))


def test_an_unwritable_cache_still_gives_the_sample(phantom_index, tmp_path):
    row, root = _first_row(phantom_index)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache's folder would be")
    settings = SampleSettings(image_size=64, augment=False)
    plain = prepare_sample(row, root, settings)
    cached = prepare_sample(row, root, SampleSettings(image_size=64, augment=False,
                                                      frame_cache=str(blocked)))
    for name in ("image", "mask", "box"):
        assert np.array_equal(plain[name], cached[name])
