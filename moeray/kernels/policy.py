"""Which kernels may run: a value carried in `EngineConfig.kernels`, applied per call.

Contract: `KernelPolicy` is immutable and holds only choices; what a machine can actually run
(a C compiler, triton, CUDA) is checked where a kernel is bound, and a kernel that is allowed
but unavailable falls back to the torch path. `KernelPolicy.torch_only()` switches every
native path off (the reference, for tests and debugging).

`using(policy)` makes a policy the one in force for the code it wraps (the engine wraps each
step in its config's policy); `active()` is what the per-op kernels consult. It is a context
variable, so concurrent threads and tasks each see their own, and leaving the block restores
the previous one. Outside any `using`, the default policy (everything allowed) is in force.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelPolicy:
    # CPU decode steps (1 to max_num_seqs sequences) as one native call (moeray/kernels/cpu/decoder.c)
    native_decoder: bool = True
    # C kernels for single operations on the torch path (small-batch GEMV, fused experts, MLA decode)
    cpu_ops: bool = True
    # Triton kernels for CUDA tensors (also subject to MOERAY_KERNELS=torch)
    triton: bool = True

    @classmethod
    def torch_only(cls) -> KernelPolicy:
        return cls(native_decoder=False, cpu_ops=False, triton=False)


_ACTIVE: contextvars.ContextVar[KernelPolicy] = contextvars.ContextVar("moeray_kernel_policy", default=KernelPolicy())


def active() -> KernelPolicy:
    return _ACTIVE.get()


@contextlib.contextmanager
def using(policy: KernelPolicy) -> Iterator[KernelPolicy]:
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)
