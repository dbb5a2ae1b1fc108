"""ExpertShard: a Ray actor holding some routed experts of every MoE layer.

Contract:
- A shard owns slots: for each MoE layer, a list of logical experts whose weights it keeps in
  two grouped tensors (the same layout as the model's `RoutedExperts`). It reads only those
  experts' tensors from the checkpoint, a local folder or an s3:// URI (by byte range there:
  a shard never downloads whole files).
- `compute(layout, layer, x, token_of_pair, slot_of_pair, weight_of_pair)` returns the weighted
  expert output for the tokens it was sent ([U, D]), using the slot table of that `layout`; it
  counts tokens per expert for load balancing.
- Slot tables are versioned so a rebalance never stops traffic: `prepare(layout, slots)` loads
  a new table beside the old one, callers switch when the Router publishes it, and
  `retire(below)` frees older tables.
- On (re)start it asks the Router for its current slots and registers, so a restarted shard
  reloads what it served before it died.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from moeray.model import ModelArgs
from moeray.model.checkpoint import CheckpointReader, read_model_args
from moeray.kernels.fp8 import ExpertScales
from moeray.model.moe import expert_pairs_forward


class StaleLayoutError(KeyError):
    """The caller used a slot layout this shard no longer (or not yet) holds: refresh and retry."""


class _SlotTable:
    """The experts of one slot layout, per MoE layer: grouped tensors as `RoutedExperts` holds
    them, in float8 with block scales when the checkpoint is FP8 and `keep_fp8` is set."""

    def __init__(self, reader: CheckpointReader, args: ModelArgs, slots: dict[int, list[int]], dtype: torch.dtype,
                 keep_fp8: bool = False, device: str = "cpu"):
        self.slots = {int(layer): list(experts) for layer, experts in slots.items()}
        d, i = args.hidden_size, args.moe_intermediate_size
        self.gate_up: dict[int, torch.Tensor] = {}
        self.down: dict[int, torch.Tensor] = {}
        self.scales: dict[int, ExpertScales | None] = {}
        for layer, experts in self.slots.items():
            stored = [reader.routed_expert_fp8(layer, e) if keep_fp8 else None for e in experts]
            fp8 = bool(experts) and all(s is not None for s in stored)
            weight_dtype = torch.float8_e4m3fn if fp8 else dtype
            gate_up = torch.empty(len(experts), 2 * i, d, dtype=weight_dtype, device=device)
            # [S, D, I] viewed from [S, I, D]: column-major, as RoutedExperts stores it
            down = torch.empty(len(experts), i, d, dtype=weight_dtype, device=device).transpose(1, 2)
            scales = None
            if fp8:
                gate_up_scales = torch.stack([s[1] for s in stored]).to(device)
                down_scales = torch.stack([s[3] for s in stored]).to(device)
                scales = ExpertScales(gate_up_scales, down_scales, reader.block_size)
            for slot, expert in enumerate(experts):
                expert_gate_up, expert_down = ((stored[slot][0], stored[slot][2]) if fp8
                                               else reader.routed_expert(layer, expert))
                gate_up[slot].copy_(expert_gate_up)
                down[slot].copy_(expert_down)
            self.gate_up[layer], self.down[layer], self.scales[layer] = gate_up, down, scales


class ExpertShard:
    def __init__(self, shard_id: int, model_path: str, slots: dict[int, list[int]], router_name: str | None = None,
                 namespace: str | None = None, dtype: str = "float32", fp8: str = "auto", device: str = "cpu"):
        self.shard_id = shard_id
        self.dtype = getattr(torch, dtype)
        self.device = device
        # FP8 checkpoints: keep experts in float8 (dequantised inside the fused MoE) where asked,
        # or by default on GPUs; a CPU shard dequantises once at load, as the model does.
        self.keep_fp8 = fp8 == "keep" or (fp8 == "auto" and device.startswith("cuda"))
        self.reader = CheckpointReader(model_path)
        self.args = read_model_args(model_path)
        self._lock = threading.Lock()
        self.router = None
        layout = 1
        if router_name is not None:
            import ray

            self.router = ray.get_actor(router_name, namespace=namespace)
            layout, slots = ray.get(self.router.slots_of.remote(shard_id))
        self.tables = {layout: self._table(slots)}
        self.counts = {layer: torch.zeros(self.args.n_routed_experts, dtype=torch.long) for layer in slots}
        if self.router is not None:
            import ray

            ray.get(self.router.register.remote(shard_id, os.getpid()))

    def compute(self, layout: int, layer: int, x: torch.Tensor, token_of_pair: torch.Tensor,
                slot_of_pair: torch.Tensor, weight_of_pair: torch.Tensor, on_device: bool = False) -> torch.Tensor:
        """The weighted expert output rows [U, D] for x's pairs: on the host in x's dtype, or on
        this shard's device when `on_device` (the NCCL data plane)."""
        table = self.tables.get(layout)
        if table is None:
            raise StaleLayoutError(f"shard {self.shard_id} has no slot table for layout {layout} "
                                   f"(has {sorted(self.tables)})")
        with torch.inference_mode():
            out = expert_pairs_forward(x.to(self.device, self.dtype), token_of_pair.to(self.device),
                                       slot_of_pair.to(self.device), weight_of_pair.to(self.device),
                                       table.gate_up[layer], table.down[layer], table.scales[layer])
        experts = torch.tensor(table.slots[layer])[slot_of_pair.cpu()]
        with self._lock:
            self.counts.setdefault(layer, torch.zeros(self.args.n_routed_experts, dtype=torch.long))
            self.counts[layer] += torch.bincount(experts, minlength=self.args.n_routed_experts)
        return out if on_device else out.to("cpu", x.dtype)

    def _table(self, slots: dict[int, list[int]]) -> _SlotTable:
        return _SlotTable(self.reader, self.args, slots, self.dtype, self.keep_fp8, self.device)

    def holds_fp8(self) -> bool:
        """True when this shard's current experts are stored in float8."""
        with self._lock:
            table = self.tables[max(self.tables)]
        return any(scales is not None for scales in table.scales.values())

    def device_type(self) -> str:
        return torch.device(self.device).type

    def device_uuid(self) -> str:
        """The physical GPU this shard computes on ("" on CPU)."""
        device = torch.device(self.device)
        return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray gave this shard (empty on CPU)."""
        import ray

        return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]

    def join_collective(self, host: str, port: int, rank: int, world: int, timeout_s: float,
                        data_plane: str = "gloo") -> None:
        """Join a replica's collective groups and serve its expert work on a thread."""
        from moeray.actors.transport import open_groups, rendezvous_store, serve_collective

        device = torch.device(self.device) if data_plane == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        control, data = open_groups(rendezvous_store(host, port, world, is_master=False), rank, world, timeout_s,
                                    data_plane)
        self._collective_data = data if data is not control else None
        compute = functools.partial(self.compute, on_device=data_plane == "nccl")
        threading.Thread(target=serve_collective, args=(control, data, compute, self.args.hidden_size, device),
                         name=f"collective-{host}:{port}", daemon=True).start()

    def leave_collective(self) -> None:
        """The replica gave up its collective groups: abort this side's NCCL group, so nothing
        posted on it blocks the device streams the actor-call path now uses."""
        data, self._collective_data = getattr(self, "_collective_data", None), None
        if data is not None:
            data.abort()

    def prepare(self, layout: int, slots: dict[int, list[int]]) -> None:
        table = self._table(slots)  # loads while old layouts keep serving
        with self._lock:
            self.tables[layout] = table

    def retire(self, below: int) -> None:
        with self._lock:
            for version in [v for v in self.tables if v < below]:
                del self.tables[version]

    def expert_counts(self) -> dict[int, list[int]]:
        with self._lock:
            return {layer: counts.tolist() for layer, counts in self.counts.items()}

    def reset_counts(self) -> None:
        with self._lock:
            for counts in self.counts.values():
                counts.zero_()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this shard runs on (placement checks, and where a restart landed)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def bytes_read(self) -> int:
        """Checkpoint bytes fetched from object storage (0 for a local checkpoint folder)."""
        return self.reader.bytes_read

    def layouts(self) -> list[int]:
        return sorted(self.tables)
