"""Serving settings: one pydantic model, loaded from YAML, overridden by environment and CLI.

Contract: `ServeSettings.load(config_file, overrides)` merges, lowest first: field defaults, the
YAML file, `MOERAY_*` environment variables (`MOERAY_PORT=9000`, nested with a double underscore:
`MOERAY_ENGINE__MAX_NUM_SEQS=32`, `MOERAY_API_KEYS=k1,k2`), then CLI overrides. Unknown keys and
wrong types raise `SettingsError` naming the key, and for YAML the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from moeray.config_io import explain, read_yaml
from moeray.engine.config import EngineConfig

ENV_PREFIX = "MOERAY_"
# MOERAY_* variables that belong to other parts of moeray, not to the Serve settings.
NOT_SETTINGS = frozenset({"MOERAY_CACHE_DIR", "MOERAY_DISABLE_CPU_KERNELS", "MOERAY_KERNELS"})


class SettingsError(ValueError):
    """A serving setting is unknown or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpeculativeSettings(_Strict):
    """Speculative decoding (see `moeray.engine.speculative`): lossless, so outputs do not change."""

    method: Literal["mtp", "ngram"] = Field(..., description="mtp: drafts from the checkpoint's multi-token-"
                                            "prediction layer; ngram: prompt lookup (no model; code, repeated text).")
    num_speculative_tokens: int = Field(1, ge=1, le=8, description="Drafts verified per step.")
    prompt_lookup_max: int = Field(4, ge=1, description="ngram: longest n-gram looked up.")
    prompt_lookup_min: int = Field(1, ge=1, description="ngram: shortest n-gram looked up.")
    min_acceptance: float = Field(0.25, ge=0, lt=1, description="A sequence whose averaged acceptance falls "
                                  "below this stops drafting (probing with one draft now and then).")
    adaptive: bool = Field(True, description="Time decode steps with drafts and without, per batch size, and "
                           "draft only where that is faster (the other mode re-measured gate_probe_interval steps after "
                           "choosing, then at doubling intervals while the choice holds).")
    gate_probe_interval: int = Field(64, ge=6, description="adaptive: steps to the first re-measurement of "
                                     "the mode not chosen.")


class EngineSettings(_Strict):
    """Options of the engine inside every model replica (see `moeray.engine.EngineConfig`)."""

    max_model_len: int | None = Field(None, ge=2, description="Longest prompt plus output, in tokens; default: "
                                      "the model's max_position_embeddings capped at 8192.")
    block_size: int = Field(16, ge=1, description="Tokens per block of the paged latent cache.")
    num_cache_blocks: int | None = Field(None, ge=1, description="Cache size in blocks; overrides "
                                         "cache_memory_fraction.")
    cache_memory_fraction: float = Field(0.1, gt=0, le=0.95, description="Share of device memory (RAM on CPU) "
                                         "for the latent cache.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget of one engine step.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences running at once per replica.")
    enable_prefix_caching: bool = Field(True, description="Share cache blocks of common prompt prefixes.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts so decodes never stall.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and activations.")
    device: str = Field("cpu", description="torch device of each replica: cpu or cuda.")
    seed: int = Field(0, description="Seed for requests that do not set one.")
    overlap_microbatches: bool = Field(False, description="With expert shards: split each step in two "
                                       "micro-batches so attention overlaps remote expert work (for shards on "
                                       "their own devices).")
    fp8: Literal["auto", "keep", "dequantize"] = Field("auto", description="FP8 checkpoints: keep the float8 "
                                                       "weights and block scales (dequantised inside the GEMM, no "
                                                       "bf16 copy) or dequantize at load; auto: keep on CUDA.")
    grammar_compile_timeout_s: float = Field(10.0, gt=0, description="A structured-output grammar (JSON schema, "
                                             "regex, tools) that takes longer to compile is refused with 400.")
    speculative: SpeculativeSettings | None = Field(None, description="Speculative decoding; empty: off.")

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump())


class RoutingSettings(_Strict):
    """How the OpenAI ingress picks a model replica for each request (with `ingress: separate`)."""

    policy: Literal["power_of_two", "prefix_cache"] = Field(
        "power_of_two", description="power_of_two: Serve's default (the shorter queue of two random replicas); "
        "prefix_cache: the replica that served the longest prefix of this prompt (Ray Serve's "
        "PrefixCacheAffinityRouter, see moeray/platform/routing.py), so multi-turn chats and shared system "
        "prompts hit its prefix cache.")
    imbalanced_threshold: int = Field(4, ge=1, description="prefix_cache: when the replicas' queues differ by "
                                      "this many requests or more, load wins and power-of-two picks.")

    def to_serve(self):
        """Serve's RequestRouterConfig, or None for Serve's default router."""
        if self.policy == "power_of_two":
            return None
        from ray.serve.config import RequestRouterConfig

        return RequestRouterConfig(request_router_class="moeray.platform.routing.PromptPrefixRouter",
                                   request_router_kwargs={"imbalanced_threshold": self.imbalanced_threshold})


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the model deployment."""

    min_replicas: int = Field(1, ge=0, description="Fewest model replicas.")
    max_replicas: int = Field(1, ge=1, description="Most model replicas.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay low this long before scaling down.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which load is averaged (Serve "
                                      "wants it longer than its 10 s metrics interval).")

    def to_serve(self) -> dict[str, Any]:
        config = self.model_dump()
        config["initial_replicas"] = max(self.min_replicas, 1)
        return config


class ExpertParallelSettings(_Strict):
    """Routed experts in ExpertShard actors (0 shards: experts stay inside each model replica)."""

    shards: int = Field(0, ge=0, description="ExpertShard actors holding the routed experts.")
    redundant_experts: int = Field(0, ge=0, description="Extra replicas per MoE layer for the hottest experts.")
    transport: Literal["ray", "collective"] = Field("ray", description="How replicas reach shards: Ray actor "
                                                    "calls, or torch.distributed point-to-point (gloo; NCCL "
                                                    "for the tensors when replica and shards hold GPUs).")
    shard_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each shard.")
    shard_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each shard.")
    placement_strategy: Literal["SPREAD", "PACK"] = Field("SPREAD", description="Placement group strategy for "
                                                          "the shards: spread over nodes or pack onto few.")
    rebalance_interval_s: float | None = Field(None, gt=0, description="Rebalance experts this often; "
                                               "empty: only on demand.")
    timeout_s: float = Field(120.0, gt=0, description="How long a layer waits for a failed shard's experts "
                             "before requests fail with 503.")


class ServeSettings(_Strict):
    """Everything `moeray serve` and the Serve application builder take."""

    model: str | None = Field(None, description="Hugging Face checkpoint folder, s3:// URI or Hub model id "
                                                "(org/name[@revision]); empty: the embedded default model.")
    served_model_name: str | None = Field(None, description="Model name clients send; default: the folder name.")
    lora_adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters served beside the "
                                          "base model: name -> PEFT adapter folder or s3:// URI. A request selects "
                                          "one by sending its name as `model`.")
    max_loras: int = Field(4, ge=1, description="LoRA adapters a model replica holds at once (configured ones "
                           "included); loading one more evicts the least recently used idle one.")
    lora_adapter_prefix: str | None = Field(None, description="A folder or s3:// prefix of PEFT adapters: a "
                                            "request whose `model` is NAME loads <prefix>/NAME on first use.")
    host: str = Field("127.0.0.1", description="HTTP listen address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Accepted bearer keys; empty: no auth.")
    admin_api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys for the admin "
                                            "routes (loading and unloading LoRA adapters). With api_keys set "
                                            "and these empty, the admin routes are closed.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine options per replica.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings,
                                             description="Model deployment autoscaling.")
    expert_parallel: ExpertParallelSettings = Field(default_factory=ExpertParallelSettings,
                                                    description="Expert shards, redundancy and transport.")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each model replica.")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each model replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a model replica accepts at once.")
    max_queued_requests: int = Field(256, ge=0, description="Requests queued for busy replicas before new ones "
                                     "get 503 with Retry-After.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 when the queue is full.")
    max_request_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted; "
                                        "larger ones get 413 before they are read whole.")
    graceful_shutdown_timeout_s: float = Field(300.0, ge=0, description="On downscale, redeploy or shutdown a "
                                               "replica takes no new requests and finishes the ones it has for "
                                               "up to this long (sized for long generations).")
    health_timeout_s: float = Field(5.0, gt=0, description="How long /health waits to learn whether a model "
                                    "replica can serve before it answers 503.")
    reasoning_parser: Literal["deepseek_r1"] | None = Field(None, description="Split the model's reasoning block "
                                                            "(<think>...</think>) into reasoning_content; structured "
                                                            "outputs and tool calls then start after it.")
    chat_template: str | None = Field(None, description="A Jinja chat template file that replaces the "
                                      "checkpoint's (for all requests).")
    routing: RoutingSettings = Field(default_factory=RoutingSettings, description="Request routing across "
                                     "model replicas.")
    app_name: str = Field("moeray", description="Ray Serve application name.")
    ingress: Literal["separate", "colocated"] = Field("separate", description="separate: an OpenAI ingress "
                                                      "deployment in front of the autoscaled model deployment; "
                                                      "colocated: the OpenAI app runs inside each model replica "
                                                      "(one Ray hop less per token; /metrics then shows the "
                                                      "replica that answers).")

    @model_validator(mode="after")
    def _routing_needs_the_ingress(self) -> ServeSettings:
        if self.routing.policy != "power_of_two" and self.ingress == "colocated":
            raise ValueError("routing.policy: prefix_cache routes the ingress's calls to the model replicas; "
                             "with ingress: colocated Serve's proxy picks the replica, so use ingress: separate")
        return self

    @model_validator(mode="after")
    def _adapter_names_are_distinct(self) -> ServeSettings:
        if self.model_name in self.lora_adapters:
            raise ValueError(f"lora_adapters: the adapter name '{self.model_name}' is the base model's name")
        return self

    @model_validator(mode="after")
    def _configured_adapters_fit(self) -> ServeSettings:
        if len(self.lora_adapters) > self.max_loras:
            raise ValueError(f"max_loras: {self.max_loras} cannot hold the {len(self.lora_adapters)} adapters in "
                             f"lora_adapters")
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            return "moeray-default"
        from moeray.hub import is_hub_id

        # A Hub model is served under its id (as vLLM does), a folder or URI under its last part.
        return self.model.partition("@")[0] if is_hub_id(self.model) else Path(self.model).name

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]

    def admin_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.admin_api_keys]

    @classmethod
    def load(cls, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
             environ: dict[str, str] | None = None) -> "ServeSettings":
        data: dict[str, Any] = {}
        document = None
        if config_file is not None:
            document = read_yaml(Path(config_file), SettingsError, "settings")
            data = document.data
        _deep_merge(data, _from_environment(os.environ if environ is None else environ))
        _deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise SettingsError(explain(err, document, config_file)) from None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["api_keys"] = self.api_key_values()
        data["admin_api_keys"] = self.admin_key_values()
        return yaml.safe_dump(data, sort_keys=False)


def _from_environment(environ: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path in (["api_keys"], ["admin_api_keys"]):
            value: Any = [k.strip() for k in raw.split(",") if k.strip()]
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return data


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
