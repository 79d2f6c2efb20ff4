"""The prefaulter maps a fresh buffer's pages ahead of a reader without changing a byte of it."""

from __future__ import annotations

import ctypes
import mmap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from safepoint import prefault
from safepoint.prefault import MIN_BYTES, Prefaulter

pytestmark = pytest.mark.skipif(prefault._MADVISE is None, reason="needs Linux madvise")

PAGE = mmap.PAGESIZE


def resident_fraction(buf: mmap.mmap) -> float:
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-len(buf) // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def populate_supported() -> bool:
    probe = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    return prefault._MADVISE(addr, PAGE, prefault._MADV_POPULATE_WRITE) == 0


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


def test_populates_a_fresh_buffer_from_the_back(pool):
    if not populate_supported():
        pytest.skip("kernel without MADV_POPULATE_WRITE (before 5.14)")
    buf = mmap.mmap(-1, MIN_BYTES * 2)
    assert resident_fraction(buf) < 0.05
    p = Prefaulter(memoryview(buf), pool)
    p.advance(MIN_BYTES)  # the reader is half way: only the back half is the helper's
    p.join()
    p.stop()
    resident = resident_fraction(buf)
    assert 0.4 < resident < 0.6, resident  # the back half, less the step left to the reader
    assert not np.frombuffer(buf, dtype=np.uint8).any()  # populated pages read as zeros


def test_never_changes_bytes_already_read(pool):
    buf = mmap.mmap(-1, MIN_BYTES + 3 * PAGE + 123)
    arr = np.frombuffer(buf, dtype=np.uint8)
    pattern = np.random.default_rng(0).integers(1, 256, len(arr), dtype=np.uint8)
    arr[:] = pattern  # every page holds data, as if the reader had filled them all
    p = Prefaulter(memoryview(buf), pool)
    p.join()
    p.stop()
    assert np.array_equal(arr, pattern)


def test_small_or_readonly_buffers_get_no_helper(pool):
    small = Prefaulter(memoryview(bytearray(MIN_BYTES - 1)), pool)
    readonly = Prefaulter(memoryview(bytes(MIN_BYTES)), pool)
    assert small._job is None and readonly._job is None
    small.stop()
    readonly.stop()
