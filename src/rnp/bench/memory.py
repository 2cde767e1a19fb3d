"""Peak memory of a block of work: CUDA's allocator peak on a GPU, the process's peak resident
set on the CPU.

On Linux the resident-set peak (``VmHWM``) is reset by writing 5 to ``/proc/self/clear_refs``,
so the peak belongs to the block alone. Where that is not possible the process's lifetime peak
is reported and the ``kind`` says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.megabytes`` and ``peak.kind``."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.megabytes: float | None = None
        self.kind = ""
        self._reset = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR_REFS.write_text("5")
                self._reset = True
            except OSError:
                self._reset = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.megabytes = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.kind = "CUDA peak allocated"
            return
        hwm = _vm_hwm_kib() if self._reset else None
        if hwm is not None:
            self.megabytes, self.kind = hwm / 1024, "peak RSS of the cell"
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.megabytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
            self.kind = "peak RSS of the process"


def _vm_hwm_kib() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
