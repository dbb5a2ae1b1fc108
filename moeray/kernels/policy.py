"""Which kernels an engine may use: a value carried in `EngineConfig.kernels`.

Contract: `KernelPolicy` is immutable and holds only choices; what a machine can actually run
(a C compiler, triton, CUDA) is checked where a kernel is bound, and a kernel that is allowed
but unavailable falls back to the torch path. `KernelPolicy.torch_only()` switches every
native path off (the reference, for tests and debugging).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelPolicy:
    # CPU decode steps (1 to max_num_seqs sequences) as one native call (moeray/kernels/cpu/decoder.c)
    native_decoder: bool = True

    @classmethod
    def torch_only(cls) -> KernelPolicy:
        return cls(native_decoder=False)
