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
