"""Where an evaluation's completions and log-likelihoods come from.

Contract: both backends implement `tasks.Backend`.
- `LocalBackend(engine)`: moeray's `Engine` in this process, over a checkpoint
  (`LocalBackend.from_checkpoint`, local or s3://) or over the weights a training job holds
  right now (its `RolloutEngine`'s engine). Generation runs every prompt in one continuous
  batch; a log-likelihood is the engine's prompt log-probabilities (`score_prompt`) summed over
  the continuation's tokens: those the tokenizer gives for context + continuation beyond the
  context's own tokens, with the special tokens the server would add (bos).
- `EndpointBackend(spec)`: an OpenAI-compatible `/v1/completions` (moeray's or another):
  generation with `n`, `temperature`, `max_tokens`, `stop` and `seed`; log-likelihoods with
  `echo` and `logprobs`, summing the prompt tokens whose `text_offset` falls in the
  continuation. HTTP failures raise `EvalError` naming the URL and the status.
"""

from __future__ import annotations

import os

from moeray.engine.params import SamplingParams
from moeray.jobs.eval.spec import EndpointSpec


class EvalError(RuntimeError):
    """The evaluation target failed to answer."""


class LocalBackend:
    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._requests = 0

    @classmethod
    def from_checkpoint(cls, model: str, max_model_len: int | None = None) -> LocalBackend:
        from moeray.engine.llm import LLM

        return cls(LLM(model, max_model_len=max_model_len).engine)  # None: the model's own length

    def generate(self, prompts, n, temperature, max_tokens, stop, seed):
        texts: dict[str, list[str]] = {}
        for i, prompt in enumerate(prompts):
            request_id = f"eval-{self._requests}"
            self._requests += 1
            self.engine.add_request(request_id, prompt, SamplingParams(n=n, temperature=temperature,
                                                                       max_tokens=max_tokens, stop=list(stop),
                                                                       seed=seed + i))
            texts[request_id] = [""] * n
        pending = set(texts)
        while pending:
            for delta in self.engine.step():
                for part in delta.outputs:
                    texts[delta.request_id][part.index] += part.text
                if delta.finished:
                    pending.discard(delta.request_id)
        return list(texts.values())

    def continuation_ids(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(token ids of context + continuation, how many of them are the context's)."""
        context_ids = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
            return whole, len(context_ids)
        return context_ids + self.tokenizer.encode(continuation, add_special_tokens=False), len(context_ids)

    def loglikelihood(self, pairs):
        totals = []
        for context, continuation in pairs:
            ids, start = self.continuation_ids(context, continuation)
            entries = self.engine.score_prompt(ids, 0)
            totals.append(sum(entry.logprob for entry in entries[start:]))
        return totals


class EndpointBackend:
    def __init__(self, spec: EndpointSpec):
        import httpx

        key = spec.api_key or (os.environ.get(spec.api_key_env) if spec.api_key_env else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.spec = spec
        self.client = httpx.Client(base_url=spec.url.rstrip("/"), headers=headers, timeout=spec.timeout_s)

    def _complete(self, body: dict) -> dict:
        import httpx

        try:
            response = self.client.post("/completions", json={"model": self.spec.model, **body})
        except httpx.HTTPError as err:
            raise EvalError(f"{self.spec.url}/completions: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise EvalError(f"{self.spec.url}/completions answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def generate(self, prompts, n, temperature, max_tokens, stop, seed):
        answers = []
        for i, prompt in enumerate(prompts):
            body = self._complete({"prompt": prompt, "n": n, "temperature": temperature, "max_tokens": max_tokens,
                                   "stop": list(stop) or None, "seed": seed + i})
            answers.append([c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])])
        return answers

    def loglikelihood(self, pairs):
        totals = []
        for context, continuation in pairs:
            text = context + continuation
            body = self._complete({"prompt": text, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
            logprobs = body["choices"][0]["logprobs"]
            total = 0.0
            for offset, value in zip(logprobs["text_offset"], logprobs["token_logprobs"]):
                if value is not None and len(context) <= offset < len(text):
                    total += value
            totals.append(total)
        return totals
