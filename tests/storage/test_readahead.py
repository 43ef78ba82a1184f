"""storage/readahead: a range hinted one read-ahead window per call (Linux reads at most one per madvise), never
an error; the window read from the device's queue, else the default."""

import mmap

import pytest

from evolver_kernels.storage import readahead


class FakeMap:
    """Records the madvise calls of will_need (a real map's calls leave no trace to check)."""

    def __init__(self, size: int):
        self.size, self.calls = size, []

    def __len__(self) -> int:
        return self.size

    def madvise(self, option: int, start: int, length: int) -> None:
        self.calls.append((option, start, length))
        if start == 0:
            raise OSError("a hint the kernel refuses is ignored")


@pytest.mark.skipif(not hasattr(mmap, "MADV_WILLNEED"), reason="no madvise WILLNEED on this system")
def test_a_range_is_hinted_in_windows_from_its_page():
    page = mmap.PAGESIZE
    m = FakeMap(100 * page)
    readahead.will_need(m, page + 5, 40 * page, 16 * page)  # starts inside page 1, one refused call ignored
    assert m.calls == [
        (mmap.MADV_WILLNEED, page, 16 * page),
        (mmap.MADV_WILLNEED, 17 * page, 16 * page),
        (mmap.MADV_WILLNEED, 33 * page, 7 * page),
    ]
    m = FakeMap(10 * page)
    readahead.will_need(m, 0, 50 * page, 4 * page)  # clipped to the map; the refused first call is no error
    assert [(s, n) for _, s, n in m.calls] == [(0, 4 * page), (4 * page, 4 * page), (8 * page, 2 * page)]
    readahead.will_need(m, 5 * page, 5 * page, page)  # an empty range: no call
    assert len(m.calls) == 3


def test_the_window_is_the_devices_or_the_default(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"0" * 16)
    window = readahead.readahead_window(str(f))
    assert window > 0 and window % 1024 == 0
    assert readahead.readahead_window(str(tmp_path / "missing")) == readahead.DEFAULT_WINDOW
