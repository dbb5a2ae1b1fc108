"""Shared test helpers: tiny random checkpoints written by transformers (the reference) and a
tiny DeepSeek-style byte-level BPE tokenizer with its chat template."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TINY_V3 = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
    initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)

TINY_V2 = dict(TINY_V3, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
               routed_scaling_factor=1.0)


def hf_model(kind: str = "v3", seed: int = 0, **overrides):
    """A randomly initialised transformers DeepseekV{2,3}ForCausalLM (float32, eval mode)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    if kind == "v3":
        config = DeepseekV3Config(**{**TINY_V3, **overrides})
        model = DeepseekV3ForCausalLM(config)
    elif kind == "v2":
        config = DeepseekV2Config(**{**TINY_V2, **overrides})
        model = DeepseekV2ForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.float().eval()


def write_hf_checkpoint(folder: Path, kind: str = "v3", seed: int = 0, **overrides):
    """Save a random transformers model in the Hugging Face layout; returns the model."""
    model = hf_model(kind, seed, **overrides)
    if kind == "v3":
        # Non-zero correction bias so the aux-loss-free choice path is exercised.
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.copy_(torch.rand(gate.e_score_correction_bias.shape, generator=gen) * 0.1)
    model.save_pretrained(folder)
    return model


BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# DeepSeek-V3 style. Block tags carry no whitespace-control dashes on purpose: the indentation and
# newlines around them vanish only if trim_blocks/lstrip_blocks are set as transformers sets them.
DEEPSEEK_STYLE_TEMPLATE = """\
{{- bos_token -}}
{% if messages and messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] -}}
    {% set conversation = messages[1:] %}
{% else %}
    {% set conversation = messages %}
{% endif %}
{% if tools %}
    {{- '\\n\\n## Tools\\n' + (tools | tojson) -}}
{% endif %}
{% for message in conversation %}
    {% if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] -}}
    {% elif message['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' + message['content'] -}}
        {% if message.get('tool_calls') %}
            {{- message['tool_calls'] | tojson -}}
        {% endif %}
        {{- '<｜end▁of▁sentence｜>' -}}
    {% else %}
        {{- raise_exception('unsupported role: ' + message['role']) -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<｜Assistant｜>' -}}
{% endif %}
"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Mixture-of-Experts models route every token to a few experts out of many.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2))\n",
    "class Config:\n    def __init__(self, name='moe'):\n        self.name = name  # keep it\n",
    "你好，世界！今天天气很好。我们在学习分词器。",
    "日本語のテキストも少し入れておきます。",
    "Emoji: 😀 🎉 👍🏽 🚀 ❤️ 👨‍👩‍👧",
    "Accents: naïve café résumé façade über Ångström señor",
]

ROUND_TRIP_TEXTS = [
    "Hello world, hello there!",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "你好，世界！今天天气很好。",
    "naïve café résumé — Ångström",
    "rocket 🚀 party 🎉 thumbs 👍🏽 family 👨‍👩‍👧",
    "mixed: 日本語 text with 😀 and tabs\tand  double  spaces",
]


@lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    """Trains once per session; every folder gets a copy of the same tokenizer.json."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return backend.to_str()


def write_tiny_tokenizer(folder: Path) -> None:
    """Writes tokenizer.json and tokenizer_config.json of a tiny DeepSeek-style tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_trained_tokenizer_json(), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # bos as a serialized AddedToken, eos as a plain string: both forms occur in real folders.
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": EOS,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": DEEPSEEK_STYLE_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def write_hf_model_folder(folder: Path, kind: str = "v3", seed: int = 0, **overrides):
    """A complete servable folder: transformers checkpoint plus the tiny tokenizer."""
    model = write_hf_checkpoint(folder, kind, seed, **overrides)
    write_tiny_tokenizer(folder)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate for one prompt (the reference), never stopping early."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()
API_KEY = "sk-test-moeray"


LORA_TARGETS = ["q_b_proj", "kv_b_proj", "o_proj", "down_proj"]


def write_random_adapter(model_folder: Path, out: Path, seed: int = 0, rank: int = 4):
    """A PEFT adapter for the model in `model_folder` whose weights are random (as if trained,
    so it changes the output; kv_b_proj is among its targets). Returns the in-memory base model
    with the adapter applied, unmerged: the reference the served adapter must equal."""
    import moeray.model
    from moeray.model.lora import apply_lora, lora_modules, save_adapter

    model = moeray.model.load(model_folder)
    apply_lora(model, LORA_TARGETS, rank=rank, alpha=2 * rank, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.5, generator=generator)
    save_adapter(model, out, str(model_folder), rank, 2 * rank, 0.0, LORA_TARGETS)
    return model.eval()


def moeray_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full forward passes over the whole sequence (no cache): the reference."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def quantize_checkpoint(folder, block: tuple[int, int]) -> None:
    """Rewrite `folder`'s 2-D projection weights as FP8 with `block` scales, in place (as V3 ships them)."""
    from safetensors.torch import load_file, save_file

    from moeray.kernels.fp8 import quantize_blocks

    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and "proj" in name:
            out[name], out[name + "_scale_inv"] = quantize_blocks(tensor, block)
        else:
            out[name] = tensor
    save_file(out, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config))


def unused_port() -> int:
    """A free port for a server that must be told its port before it starts (Serve's proxy,
    `moeray serve --port`). It comes from below the kernel's ephemeral range and above Ray's
    worker ports (10002-19999), so nothing that binds port 0 (Ray's own servers, clients' local
    ends) can take it between this check and the server's bind."""
    import random
    import socket

    low, _ = (int(v) for v in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(100):
        port = random.randrange(20000, min(low, 32768))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


def deploy(settings: dict, route_prefix: str, port: int, name: str) -> str:
    """Run one moeray Serve app and wait until it answers /health; returns its base URL."""
    from ray import serve

    from moeray.platform.serve_app import build_app

    serve.run(build_app(settings), name=name, route_prefix=route_prefix, blocking=False)
    base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    if not wait_healthy(base, 180):
        raise TimeoutError(f"app {name} did not become healthy")
    return base


def undeploy(name: str) -> None:
    """Delete a Serve app and the actors its replicas share (the expert Router, which owns the
    shards, and the adapter catalog): an idle app's pollers would otherwise slow every later test."""
    import ray
    from ray import serve

    serve.delete(name)
    for actor in (f"{name}-router", f"{name}-adapters"):
        try:
            ray.kill(ray.get_actor(actor, namespace="moeray"))
        except ValueError:  # this app had none
            pass


def wait_for(condition, timeout_s: float, what: str) -> None:
    """Poll `condition()` every 0.1 s until it holds; fail the test naming `what` after `timeout_s`."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_healthy(base: str, timeout_s: float, still_starting=lambda: True) -> bool:
    """Poll GET {base}/health until it answers 200 (True), `timeout_s` passes or
    `still_starting()` turns false (False)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and still_starting():
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class ServeProcess:
    """A real `moeray serve` process on 127.0.0.1 (its own Ray), its output in `log_path`.

    `start()` waits until /health answers 200 (or the process exits, or `timeout_s` passes) and
    raises with the log then; `stop()` sends SIGTERM (a drain) and waits for the exit code.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        import os

        self.port = unused_port()
        self.args, self.log_path = args, log_path
        self.env = {**os.environ, **(env or {})}
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 240.0) -> "ServeProcess":
        import subprocess
        import sys

        log = open(self.log_path, "w")
        # --verbose: Ray's and Serve's logs go to the same file, for the message of a failing test.
        self.process = subprocess.Popen([sys.executable, "-m", "moeray.platform.cli", "serve", *self.args,
                                         "--port", str(self.port), "--verbose"], stdout=log,
                                        stderr=subprocess.STDOUT, env=self.env)
        if wait_healthy(self.url, timeout_s, still_starting=lambda: self.process.poll() is None):
            return self
        if self.process.poll() is not None:
            raise RuntimeError(f"moeray serve exited with {self.process.returncode}:\n{self.log()}")
        self.kill()
        raise TimeoutError(f"moeray serve did not become healthy in {timeout_s:.0f} s:\n{self.log()}")

    def stop(self, timeout_s: float = 120.0) -> int:
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


# ---- fine-tuning jobs ----------------------------------------------------------------------------
def sft_rows(n: int = 48) -> list[dict]:
    """Conversations a tiny model learns in a few steps: counting on from a number."""
    rows = []
    for i in range(n):
        a = i % 7
        rows.append({"messages": [{"role": "user", "content": f"count from {a}"},
                                  {"role": "assistant", "content": " ".join(str(a + k) for k in range(5))}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def train_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def run_and_kill_workers(run, spec, metrics: Path, after_lines: int, timeout_s: float = 300):
    """`run(spec)` in a thread; once `metrics` has `after_lines` lines, SIGKILL every Ray Train
    worker. Returns (the run's result, the number of lines when the workers were killed)."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(spec)))
    thread.start()
    deadline = time.monotonic() + timeout_s
    killed_at = None
    while time.monotonic() < deadline and killed_at is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        pids = train_worker_pids()
        if len(lines) >= after_lines and pids:
            killed_at = len(lines)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=2 * timeout_s)
    return outcome.get("result"), killed_at


def method_loss(model, spec, rows: list[dict], reference=None):
    """What a training worker's step computes for `rows` (already encoded): (loss, metrics)."""
    from moeray.jobs.methods import WorkerContext, method_for
    from moeray.model.tokenizer import Tokenizer

    context = WorkerContext(spec, Tokenizer.__new__(Tokenizer), model, torch.device("cpu"), reference=reference)
    return method_for(spec).loss(model, rows, context)


def encoded_rows(spec, rows: list[dict], tokenizer, held_out: bool | None = False) -> list[dict]:
    """The method's examples of `rows` as the workers get them: the training side of the spec's
    held-out split (held_out=False), its held-out side (True), or all rows (None)."""
    from moeray.jobs.methods import method_for
    from moeray.jobs.trainer import prepare, row_hash

    if held_out is not None and spec.data.eval_fraction:
        threshold = prepare(spec).held_out_below
        rows = [row for row in rows if (row_hash(row, spec.train.seed) < threshold) == held_out]
    return method_for(spec).encode(rows, tokenizer, not held_out)


def make_spec(tmp_path: Path, base: Path, method: str = "sft", **changes):
    """A job spec of `base` with data at tmp_path/train.jsonl and everything written under tmp_path;
    `changes` replace top-level keys (dicts are merged into the section)."""
    from moeray.jobs.spec import parse_spec

    spec = {"name": f"job-{method}", "base_model": str(base), "method": method, "output": str(tmp_path / "out"),
            "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25},
            "train": {"learning_rate": 3e-3, "max_steps": 24, "per_device_batch_size": 4, "max_length": 64,
                      "lr_schedule": "constant"},
            "checkpoint": {"storage": str(tmp_path / "ckpt"), "every_steps": 8, "keep": 2},
            "eval": {"every_steps": 8}}
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_spec(spec)


def transcribed_mtp_logits(model, tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """P^k for k = 1..depth over one sequence t_0..t_{T-1}, written from DeepSeek-V3's paper:
        h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]     (embedding first, as V3's weights)
        h^k_{0:T-k} = TRM_k(h'^k_{0:T-k})                              (causal, its own block)
        P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))                          (the shared head)
    with h^0 the main model's final (normed) hidden state. TRM_k is a standard decoder block;
    row i of P^k is the distribution of t_{i+k+1}."""
    from moeray.model.mla import DenseCausalAttention

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.args.rms_norm_eps) * weight

    emb, n = model.model.embed_tokens.weight, tokens.numel()
    hidden = model.forward_tokens(tokens, torch.arange(n), DenseCausalAttention(1, n))
    out = []
    for k in range(1, depth + 1):
        layer, length = model.model.mtp_layers[k - 1], n - k
        joined = torch.cat([rms_norm(emb[tokens[k:]], layer.enorm.weight), rms_norm(hidden[:length], layer.hnorm.weight)],
                           dim=-1)
        block = super(type(layer), layer).forward  # the decoder block itself
        hidden = block(joined @ layer.eh_proj.weight.T, model.rotary(torch.arange(k, n)),
                       DenseCausalAttention(1, length), None)
        out.append(rms_norm(hidden, layer.shared_head.norm.weight) @ model.lm_head.weight.T)
    return out
