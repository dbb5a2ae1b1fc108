"""Model configuration: one `ModelArgs` dataclass keyed by the Hugging Face `config.json` names.

Contract:
- `ModelArgs.from_hf_config(dict)` accepts the `config.json` of both `deepseek_v2` and
  `deepseek_v3` checkpoints (including the legacy `rope_scaling` and the transformers-5
  `rope_parameters` spelling). Unknown keys and contradictory values raise `ConfigError`
  naming the key; bookkeeping keys that transformers writes are ignored.
- `ModelArgs.preset(name)` gives the named configurations (`tiny`, `default`, `small`, `v2-lite`,
  `v3-671b`).
- `to_hf_config()` writes a `config.json` dict that transformers and `from_hf_config` both read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration value is unknown, malformed or contradicts another one."""


SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")

# Keys transformers (or DeepSeek's own release) writes that do not change inference.
_IGNORED_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "_name_or_path", "model_type",
    "torch_dtype", "dtype", "use_cache", "output_router_logits", "output_hidden_states",
    "output_attentions", "return_dict", "pretraining_tp", "initializer_range", "attention_dropout",
    "aux_loss_alpha", "seq_aux", "ep_size", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "qk_head_dim", "head_dim", "mlp_bias",
    "num_mtp_layers", "router_aux_loss_coef", "tf_legacy_loss", "use_bfloat16", "pruned_heads",
    "torchscript", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "quantization_config",
})


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension (`rope_scaling` / `rope_parameters` with type `yarn`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class ModelArgs:
    # Vocabulary and width.
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256  # width of the dense MLP layers
    num_hidden_layers: int = 3
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Multi-head latent attention.
    num_attention_heads: int = 4
    q_lora_rank: int | None = 64  # None: a plain q_proj, as in DeepSeek-V2-Lite
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    attention_bias: bool = False
    # Rotary embedding.
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # rotate adjacent pairs (DeepSeek's layout) rather than halves
    rope_yarn: YarnScaling | None = None
    # DeepSeekMoE.
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    moe_intermediate_size: int = 64
    num_experts_per_tok: int = 4
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 4
    topk_group: int = 2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Extra layers stored after the main stack (multi-token prediction); skipped when loading.
    num_nextn_predict_layers: int = 0
    # Special tokens (the tokenizer is authoritative; these mirror config.json).
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    # FP8 block size from `quantization_config.weight_block_size`, when the checkpoint is FP8.
    fp8_block_size: tuple[int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale, with YaRN's mscale correction squared (as DeepSeek does)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_yarn is not None and self.rope_yarn.mscale_all_dim:
            m = yarn_mscale(self.rope_yarn.factor, self.rope_yarn.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def cache_numbers_per_token(self) -> int:
        """Numbers MLA caches per token and layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def full_kv_numbers_per_token(self) -> int:
        """What a conventional per-head K/V cache would hold per token and layer."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}': {why}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
        need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             "must be null (plain q_proj) or a positive integer")
        need(not self.tie_word_embeddings, "tie_word_embeddings",
             "DeepSeek models have an untied LM head; true is not supported")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func",
             f"unknown value {self.scoring_func!r}, expected one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method",
             f"unknown value {self.topk_method!r}, expected one of {TOPK_METHODS}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        if self.first_k_dense_replace < self.num_hidden_layers or self.n_routed_experts:
            need(self.intermediate_size > 0 or self.first_k_dense_replace == 0, "intermediate_size",
                 "dense layers need a positive intermediate_size")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok
                 <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be between 1 and n_routed_experts ({self.n_routed_experts}), "
                 f"got {self.num_experts_per_tok!r}")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            if self.topk_method in ("group_limited_greedy", "noaux_tc"):
                need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                     f"must divide n_routed_experts ({self.n_routed_experts}), got {self.n_group}")
                need(1 <= self.topk_group <= self.n_group, "topk_group",
                     f"must be between 1 and n_group ({self.n_group}), got {self.topk_group}")
                per_group = self.n_routed_experts // self.n_group
                need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                     f"{self.num_experts_per_tok} experts cannot be chosen from {self.topk_group} "
                     f"groups of {per_group}")
            if self.topk_method == "noaux_tc":
                need(self.n_routed_experts // self.n_group >= 2, "n_group",
                     "noaux_tc scores a group by its top-2 experts; each group needs at least 2")
        if self.rope_yarn is not None:
            need(self.rope_yarn.factor >= 1.0, "rope_scaling.factor", "must be >= 1")
            need(self.rope_yarn.original_max_position_embeddings > 0,
                 "rope_scaling.original_max_position_embeddings", "must be positive")

    # ---- Hugging Face config.json --------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        config = dict(config)
        model_type = config.pop("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v2", "deepseek_v3"):
            raise ConfigError(f"config key 'model_type': {model_type!r} is not a DeepSeek-V2/V3 model")
        is_v3 = model_type == "deepseek_v3"
        defaults = {
            "scoring_func": "sigmoid" if is_v3 else "softmax",
            "topk_method": "noaux_tc" if is_v3 else "greedy",
            "norm_topk_prob": is_v3,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "moe_layer_freq": 1,
            "n_shared_experts": 0,
            "num_nextn_predict_layers": 0,
        }
        heads = config.get("num_attention_heads")
        kv_heads = config.pop("num_key_value_heads", None)
        if kv_heads is not None and kv_heads != heads:
            raise ConfigError(f"config key 'num_key_value_heads': MLA shares one latent across heads, so it "
                              f"must equal num_attention_heads ({heads}), got {kv_heads}")
        act = config.pop("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config key 'hidden_act': only 'silu' (SwiGLU) is supported, got {act!r}")

        rope_theta, yarn = _parse_rope(config)
        fp8_block = _parse_quantization(config.get("quantization_config"))

        names = {f.name for f in dataclasses.fields(cls)} - {"rope_yarn", "fp8_block_size", "model_type"}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key in names:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS:
                raise ConfigError(f"config key '{key}' is not a known DeepSeek-V2/V3 setting")
        for key, value in defaults.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        if kwargs.get("n_routed_experts") is None:
            kwargs["n_routed_experts"] = 0
        return cls(**kwargs, rope_theta=rope_theta, rope_yarn=yarn, model_type=model_type,
                   fp8_block_size=fp8_block)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        return cls.from_json(Path(path).read_text(), str(path))

    @classmethod
    def from_json(cls, text: str, source: str) -> "ModelArgs":
        """Parse a config.json's text; errors name `source` (its path or URI) and the line."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}:{err.lineno}: invalid JSON ({err.msg})") from None
        try:
            return cls.from_hf_config(config)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_config(self) -> dict[str, Any]:
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("rope_yarn", "rope_theta", "fp8_block_size")}
        config["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                                   else "DeepseekV2ForCausalLM"]
        config["num_key_value_heads"] = self.num_attention_heads
        config["hidden_act"] = "silu"
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_yarn is not None:
            rope = {"rope_type": "yarn", "rope_theta": self.rope_theta,
                    **{k: v for k, v in dataclasses.asdict(self.rope_yarn).items() if v is not None}}
        config["rope_parameters"] = rope
        return config

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelArgs":
        try:
            return PRESETS[name]()
        except KeyError:
            raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

    def num_parameters(self, active_experts: int | None = None, input_embedding: bool = True) -> int:
        """Parameter count without building the model (the MTP layer is not counted).

        `active_experts` counts only that many routed experts per MoE layer and
        `input_embedding=False` leaves out the embedding table: together, the weights one decode
        step reads (an embedding lookup touches one row).
        """
        d, h = self.hidden_size, self.num_attention_heads
        q = d * h * self.qk_head_dim if self.q_lora_rank is None else (
            d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim)
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank \
            + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + h * self.v_head_dim * d + 2 * d
        total = (2 if input_embedding else 1) * self.vocab_size * d + d
        routed = self.n_routed_experts if active_experts is None else min(active_experts, self.n_routed_experts)
        for layer in range(self.num_hidden_layers):
            total += attn
            if self.is_moe_layer(layer):
                width = self.moe_intermediate_size
                total += 3 * d * width * (routed + self.n_shared_experts)
                total += self.n_routed_experts * d
            else:
                total += 3 * d * self.intermediate_size
        return total


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _parse_rope(config: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """Pop rope_theta / rope_scaling / rope_parameters and return (theta, yarn or None)."""
    legacy = config.pop("rope_scaling", None)
    params = config.pop("rope_parameters", None)
    key = "rope_parameters" if params is not None else "rope_scaling"
    params = dict(params or legacy or {})
    theta = params.pop("rope_theta", None)
    top_theta = config.pop("rope_theta", None)
    theta = float(theta if theta is not None else top_theta if top_theta is not None else 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config key '{key}.rope_type': unsupported {rope_type!r}, expected one of {ROPE_TYPES}")
    if rope_type == "default":
        if params.get("factor") not in (None, 1.0):
            raise ConfigError(f"config key '{key}.factor': set without rope_type 'yarn'")
        return theta, None
    fields = {f.name for f in dataclasses.fields(YarnScaling)}
    for name in params:
        if name not in fields:
            raise ConfigError(f"config key '{key}.{name}' is not a YaRN parameter")
    original = params.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if params.get("factor") is None:
        if not original:
            raise ConfigError(f"config key '{key}.factor' is required for YaRN")
        params["factor"] = config["max_position_embeddings"] / original
    params["original_max_position_embeddings"] = original
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if params.get(name) is None:
            params.pop(name, None)
    try:
        return theta, YarnScaling(**params)
    except TypeError as err:
        raise ConfigError(f"config key '{key}': {err}") from None


def _parse_quantization(quant: dict[str, Any] | None) -> tuple[int, int] | None:
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config key 'quantization_config.quant_method': only 'fp8' is supported, got {method!r}")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config key 'quantization_config.fmt': only 'e4m3' is supported, got {fmt!r}")
    block = quant.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
        raise ConfigError(f"config key 'quantization_config.weight_block_size': expected [rows, cols], got {block!r}")
    return int(block[0]), int(block[1])


def _tiny() -> ModelArgs:
    # Every test uses this flavor: one dense layer then MoE layers, grouped sigmoid routing.
    return ModelArgs()


def _default() -> ModelArgs:
    # The embedded default model's shape (moeray/assets/default-model, `make default-model`): about
    # 5M parameters with its MTP layer, 10 MB in bfloat16, trainable on 2 CPU cores.
    return ModelArgs(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=8, moe_intermediate_size=128, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=2048, num_nextn_predict_layers=1,
    )


def _small() -> ModelArgs:
    # About 280M parameters: the benchmark model (random weights, float32 on CPU).
    return ModelArgs(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32, moe_intermediate_size=256,
        num_experts_per_tok=8, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=4096, routed_scaling_factor=2.5,
    )


def _v2_lite() -> ModelArgs:
    return ModelArgs(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, moe_intermediate_size=1408, num_experts_per_tok=6, first_k_dense_replace=1,
        scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        rope_yarn=YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                              mscale_all_dim=0.707),
    )


def _v3_671b() -> ModelArgs:
    return ModelArgs(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        moe_intermediate_size=2048, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, max_position_embeddings=163840,
        num_nextn_predict_layers=1, fp8_block_size=(128, 128),
        rope_yarn=YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                              mscale_all_dim=1.0),
    )


PRESETS = {"tiny": _tiny, "default": _default, "small": _small, "v2-lite": _v2_lite, "v3-671b": _v3_671b}
