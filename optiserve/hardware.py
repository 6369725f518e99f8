"""What this machine has: CPU facts for results, and CUDA detection for GPU-only plugins."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import socket
import subprocess

from optiserve.types import MachineInfo


@functools.cache
def machine_info() -> MachineInfo:
    import psutil

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return MachineInfo(
        hostname=socket.gethostname(),
        cpu_model=cpu_model,
        logical_cpus=os.cpu_count() or 1,
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        platform=platform.platform(),
        python=platform.python_version(),
    )


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int8_dot_product_saturates() -> bool:
    """Whether ONNX Runtime's u8×s8 kernels can saturate here.

    x86 CPUs without VNNI multiply u8×s8 with ``vpmaddubsw``, which adds pairs of products into a
    saturating int16: with 8-bit weights large products clip and accuracy drops (measured on
    EfficientNet-Lite0 on an AVX2-only CPU: 94.8% top-1 agreement simulated, 84% with the fused
    kernels). VNNI (AVX512-VNNI, AVX-VNNI) and AMX accumulate in int32; ARM has no such issue.
    """
    if platform.machine().lower() not in {"x86_64", "amd64", "i686", "x86"}:
        return False
    flags = cpu_flags()
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


INT8_FEATURES = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
"""The x86 features that decide how (and how accurately) INT8 kernels run."""


def int8_cpu_features() -> tuple[str, ...]:
    """Which of :data:`INT8_FEATURES` this CPU has (empty off x86)."""
    if platform.machine().lower() not in {"x86_64", "amd64", "i686", "x86"}:
        return ()
    flags = cpu_flags()
    return tuple(f for f in INT8_FEATURES if f in flags)


@functools.cache
def cuda_available() -> tuple[bool, str]:
    """(ok, reason). Checked without importing torch: nvidia-smi must list a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "no CUDA GPU: nvidia-smi is not on PATH"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"no CUDA GPU: nvidia-smi failed ({e})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return False, "no CUDA GPU: nvidia-smi lists none"
    return True, out.stdout.splitlines()[0]
