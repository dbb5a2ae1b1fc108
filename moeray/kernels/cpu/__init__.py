"""CPU decode kernels (`decode.c`: one operation per call; `decoder.c`: the whole decoder stack
for a few decode tokens per call; `common.h`: their shared helpers), compiled with the system C
compiler on first use.

Contract: `library()` returns the loaded ctypes library, or None when no compiler is available
or the build fails (the reason is logged once and `unavailable_reason()` says it); callers then
use the torch reference path. Builds are cached per source hash and machine under
`$MOERAY_CACHE_DIR` (default `~/.cache/moeray`), so a Ray worker on another host builds its own.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "decode.c", HERE / "decoder.c"]
HEADERS = [HERE / "common.h", HERE / "panels.h", HERE / "decoder.h"]


def _cache_dir() -> Path:
    return Path(os.environ.get("MOERAY_CACHE_DIR", Path.home() / ".cache" / "moeray")) / "kernels"


def build(target: Path, flags: tuple[str, ...] = ()) -> None:
    """Compile the sources into `target`; `flags` come last, so they can override the defaults
    (the tests build `-DMOERAY_VECTOR_BITS=512` and a portable `-march=x86-64` variant)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *map(str, SOURCES), *flags,
               "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[:2000]}")
        os.replace(out, target)  # atomic: concurrent processes never load a half-written file


@functools.cache
def library() -> ctypes.CDLL | None:
    path = library_path()
    return None if path is None else load(path)


def library_path() -> Path | None:
    """The built shared library (built on first use), or None where it cannot be built."""
    return _built()[0]


@functools.cache
def _built() -> tuple[Path | None, str | None]:
    """(library, None), or (None, why not): built once per process and source hash."""
    if os.environ.get("MOERAY_DISABLE_CPU_KERNELS") == "1":
        return None, "disabled by MOERAY_DISABLE_CPU_KERNELS=1"
    sources = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(sources + platform.machine().encode() + platform.node().encode()).hexdigest()[:16]
    target = _cache_dir() / f"decode-{key}.so"
    try:
        if not target.exists():
            build(target)
        load(target)  # a library that does not load is no library
        return target, None
    except (OSError, RuntimeError) as err:
        logger.warning("moeray CPU decode kernels unavailable, using torch: %s", err)
        return None, str(err)


def load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' signatures."""
    # torch is imported first, so libgomp.so.1 resolves to the OpenMP runtime torch uses:
    # one thread pool, not two fighting over the cores.
    import torch  # noqa: F401

    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_long
    lib.moeray_gemv.argtypes = [p, i, i, i, ctypes.c_int, p, i, p, i, i]
    lib.moeray_gemv.restype = None
    lib.moeray_gemv_batched.argtypes = [p, i, i, i, i, ctypes.c_int, p, i, i, p, i, i, i, i]
    lib.moeray_gemv_batched.restype = None
    lib.moeray_moe_pairs.argtypes = [p, i, p, p, p, i, p, p, i, p, i]
    lib.moeray_moe_pairs.restype = None
    lib.moeray_mla_decode.argtypes = [p, p, p, p, p, i, p, p, i, i, i, i, i, i, ctypes.c_float]
    lib.moeray_mla_decode.restype = None
    lib.moeray_stream_sum.argtypes = [p, i, ctypes.c_int]
    lib.moeray_stream_sum.restype = ctypes.c_double
    return lib


HUGE_PAGE = 2 << 20


def huge_page_floats(numel: int) -> torch.Tensor:
    """A float32 tensor [numel] in anonymous memory aligned to 2 MB and advised for transparent
    huge pages (where the OS has them). Memory the decode kernels stream from: 2 MB pages spare the
    TLB a miss every 4 KB and keep the stream physically contiguous, and unlike 4 KB pages their
    placement does not vary from one allocation to the next (which moved the decode rate by up to
    ±10% here). The tensor keeps its mapping alive; its pages are committed on first touch."""
    import torch

    region = mmap.mmap(-1, numel * 4 + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.float32)  # holds a reference to `region`
    start = (-whole.data_ptr()) % HUGE_PAGE // 4
    return whole[start:start + numel]


def unavailable_reason() -> str | None:
    return _built()[1]
