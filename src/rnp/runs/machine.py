"""Which machine computed something: kept with trained subjects and benchmark records.

The processor matters beyond speed: bfloat16 kernels differ between instruction sets (AMX
tiles, AVX512-BF16), so the same seeds can train or defend to other weights on another
processor.
"""

from __future__ import annotations

import platform

import torch

from rnp import __version__


def machine(device) -> dict:
    """The versions, device, processor and threads in effect now, JSON-ready."""
    device = torch.device(device)
    return {"rnp_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": device_name(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bfloat16_instructions": bfloat16_instructions(), "threads": torch.get_num_threads(),
            "host": platform.node()}


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name as Linux reports it
    (``platform.processor()`` says only x86_64 there), else what :mod:`platform` knows."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bfloat16_instructions() -> str:
    """The CPU's native bfloat16 instructions that torch sees: "amx" (tiles, which oneDNN
    prefers), "avx512_bf16", or "none"."""
    for name, check in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        supported = getattr(torch.cpu, check, None)
        if supported is not None and supported():
            return name
    return "none"
