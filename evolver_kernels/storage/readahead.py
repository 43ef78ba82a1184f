"""Asking the kernel to read a mapped file's pages ahead (madvise WILLNEED), so that the disk reads the next
tensor while this one is merged. Linux reads at most one read-ahead window per call (force_page_cache_ra caps
the request at the device's read_ahead_kb): a hint for a whole 90 MB tensor reads its first 8 MB. So a range is
asked for in pieces of that window, each call only queueing the reads (0.06 s of calls for 512 MB here)."""

from __future__ import annotations

import contextlib
import mmap
import os

DEFAULT_WINDOW = 128 << 10  # Linux's default read_ahead_kb, when the device's own cannot be read


def readahead_window(path: str) -> int:
    """Bytes the kernel reads ahead per request on the device holding `path` (its queue's read_ahead_kb; the
    partition's disk for a partition), else DEFAULT_WINDOW (tmpfs, overlay, other systems)."""
    try:
        dev = os.stat(path).st_dev
        block = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        for queue in (f"{block}/queue", f"{block}/../queue"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"{queue}/read_ahead_kb") as f:
                    kb = int(f.read())
                if kb > 0:
                    return kb << 10
    except OSError:
        pass
    return DEFAULT_WINDOW


def will_need(mm: mmap.mmap, start: int, end: int, window: int) -> None:
    """Hints that bytes [start, end) of the map will be read soon, one read-ahead window per call; never an error."""
    if not hasattr(mmap, "MADV_WILLNEED") or end <= start:
        return
    at = start // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(end, len(mm))
    while at < end:
        length = min(window, end - at)
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_WILLNEED, at, length)
        at += length
