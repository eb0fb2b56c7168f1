"""Process settings for a training run: what Python and the C library do by default costs CPU training time.

- The garbage collector: what is built before training (imported modules, the config, the model: about half a
  million objects) lives for the whole run. Freezing it keeps Python's full collections from scanning it all again
  during training: pauses every few epochs that hand-written loops, with smaller heaps, do not pay.
- Freed memory (glibc only): PyTorch's CPU allocator has no cache. Each training step's activations and gradients
  go back to glibc's malloc, which returns large blocks to the OS (unmapping them, or trimming the heap), and the
  next step faults every page in again, zeroed: thousands of page faults a step, a good part of CPU training time
  (benchmarks/README.md). Serving every block from the heap and never trimming it makes steps
  reuse the same pages; the peak memory is unchanged, it is just not returned between steps. This is what PyTorch's
  CPU tuning guide gets by preloading jemalloc or tcmalloc, done with glibc's own ``mallopt``.

- At exit, Python collects every generation while it tears the modules down: with torch, Lightning and matplotlib
  loaded, a second of CPU time spent on objects that die with the process (``end_without_collecting``).

On GPUs the first two are on too and matter less: device memory has PyTorch's caching allocator, and steps are shorter.
"""

import contextlib
import ctypes
import gc
import platform
from collections.abc import Iterator

# mallopt parameters and glibc's defaults for them (malloc.h, mallopt(3))
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def tuned_for_training(keep_freed: bool = True) -> Iterator[None]:
    """Within the block, the objects that exist now are frozen for the garbage collector and (with ``keep_freed``)
    glibc keeps freed memory; both are undone after it, for callers that go on in this process (tests, notebooks)."""
    gc.freeze()
    try:
        with keep_freed_memory(keep_freed):
            yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Within the block, glibc keeps freed memory for reuse; after it, its default thresholds apply and the kept
    memory goes back to the OS. Processes forked inside it (data-loader workers) keep the setting. A no-op where
    the C library is not glibc (macOS, Windows, musl) or with ``enabled=False``.
    """
    libc = ctypes.CDLL(None) if enabled and platform.libc_ver()[0] == "glibc" else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)  # no block mapped on its own, so none is unmapped when freed
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never give the heap's free top back
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def end_without_collecting() -> None:
    """Spare the ending process Python's last full garbage collection; call it last, once every file is closed.

    The collection at exit scans every object the imports and the run made (over a second on 2 CPU cores, for
    torch, Lightning and matplotlib); frozen objects are left out of it. Objects outside reference cycles are still
    freed, and their finalizers run, as the modules are cleared.
    """
    gc.freeze()
