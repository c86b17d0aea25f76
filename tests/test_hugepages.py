import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moestream.runtime.store.hugepages import HUGE, back_with_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kb(addr: int) -> int:
    """AnonHugePages of the mapping holding ``addr`` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m and int(m.group(1), 16) <= addr < int(m.group(2), 16):
            for rest in lines[i + 1 :]:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", rest):
                    break
                if rest.startswith("AnonHugePages:"):
                    return int(rest.split()[1])
    return 0


def test_contents_kept_and_small_arrays_left_alone():
    a = mx.array(np.random.default_rng(0).integers(0, 2**32, 3 * HUGE // 4, dtype=np.uint32))  # 3 huge pages
    mx.eval(a)
    view = np.asarray(memoryview(a))
    want = view.copy()
    done = back_with_huge_pages(view)
    np.testing.assert_array_equal(view, want)
    np.testing.assert_array_equal(np.array(a), want)
    assert back_with_huge_pages(np.zeros(1000, np.uint8)) == 0
    if not sys.platform.startswith("linux"):
        assert done == 0
    elif THP.exists() and "[never]" not in THP.read_text():
        assert done >= HUGE  # 6 MB hold at least one whole huge page of 2 MB, however aligned


@pytest.mark.skipif(
    not THP.exists() or "[madvise]" not in THP.read_text(),
    reason="transparent huge pages not on madvise here (always: nothing to show; never: none)",
)
def test_mlx_memory_moves_onto_huge_pages():
    a = mx.array(np.random.default_rng(1).integers(0, 2**32, 4 * HUGE // 4, dtype=np.uint32))  # 4 huge pages
    mx.eval(a)
    view = np.asarray(memoryview(a))
    done = back_with_huge_pages(view)
    assert done >= 2 * HUGE  # at least the whole 2 MB pages inside 8 MB, however it is aligned
    first = -(-view.ctypes.data // HUGE) * HUGE  # the advised range starts at the first 2 MB boundary
    if _anon_huge_kb(first) == 0:
        pytest.skip("MADV_COLLAPSE did not collapse here (kernel before 6.1, or no free huge pages)")
    assert _anon_huge_kb(first) * 1024 >= HUGE
