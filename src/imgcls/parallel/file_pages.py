"""Pages of a memory-mapped weights file, handed back once read, so that reading a file piece by piece never counts
the whole file as a process's memory (pages read stay resident until the whole file is unmapped)."""

import ctypes
import mmap
from pathlib import Path

from torch import Tensor

MAPS = Path("/proc/self/maps")  # Linux; elsewhere nothing is handed back
MADV_DONTNEED = 4


class FilePages:
    """The private mappings of files in this process, read once (Linux ``/proc/self/maps``)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        if MAPS.is_file():
            for line in MAPS.read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    self.ranges.append((start, end))
        self.libc = ctypes.CDLL(None) if self.ranges else None

    def release(self, tensor: Tensor) -> None:
        """Drop the pages under ``tensor`` if it lies in a file mapping: the file is read again if they are needed.

        Only read-only use is safe: a private mapping's pages that were written to would be lost.
        """
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if self.libc is None or not any(low <= start and end <= high for low, high in self.ranges):
            return
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
