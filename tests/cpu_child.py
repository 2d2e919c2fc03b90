"""Run test code in a child process whose Numba compiles for another CPU (LLVM target name and
features), so that one machine checks every kernel path it can execute (tests/test_gemv.py,
tests/test_quant_int8dot.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO512 = "-avx512f,-avx512bw,-avx512vl,-avx512vnni,-avx512dq,-avx512cd"  # an LLVM target without AVX-512


def run_for_cpu(cpu, features, needs, code, cache_dir):
    """Skip when this CPU lacks a /proc/cpuinfo flag in `needs`; otherwise run `code` in a child
    compiled for (cpu, features) -> the JSON its last line of output prints."""
    from npgpt2.int8_dot import cpu_info
    missing = set(needs) - set(cpu_info()["flags"])
    if missing:
        pytest.skip(f"this CPU lacks {missing}")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(cache_dir),
               PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# the CPU paths are x86 ISA levels, named as LLVM's x86 targets
x86_linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                                    reason="x86-64 Linux: the CPU paths are x86 ISA levels")
