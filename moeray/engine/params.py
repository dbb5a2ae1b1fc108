"""Per-request generation parameters and the error every invalid request raises.

Contract: `SamplingParams.validate()` checks every field and raises `InvalidRequestError` whose
`param` names the offending field (the HTTP layer turns it into a 400 naming that parameter).
No torch: the scheduler side of the engine imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request that can never be served as asked; raised before any work is done."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16


def short_repr(value, limit: int = 80) -> str:
    """repr() cut to `limit` characters: an error message never echoes a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls")


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match (`engine/grammar.py` compiles it).

    kind: json_schema (spec: the schema as JSON), json_object, regex (spec: the pattern), choice
    (spec: a JSON list of strings), grammar (spec: EBNF), tool_calls (spec: JSON with the
    tools, the tool choice and the markup format). `param` is the request parameter an error
    about it names; `start_after` holds the grammar back until that text was generated (the end
    of a reasoning block)."""

    kind: str
    spec: str = ""
    param: str = "response_format"
    strict: bool = True
    start_after: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequestError(f"{self.param}: unknown kind of structured output {self.kind!r}; expected "
                                      f"one of {', '.join(GRAMMAR_KINDS)}", self.param)

    def cache_key(self) -> tuple:
        """What the compiled grammar depends on (start_after does not change it)."""
        return self.kind, self.spec, self.strict


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: until a stop condition or the model's context is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus the top k alternatives
    prompt_logprobs: int | None = None  # also for every prompt token after the first (echo, scoring)
    skip_special_tokens: bool = True
    structured: GrammarSpec | None = None  # constrain the output to a grammar
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def need(ok: bool, param: str, why: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{param} {why}, got {short_repr(getattr(self, param))}", param)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        need(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             "must be an integer >= 1")
        need(isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature, "temperature", "must be >= 0")
        need(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1), "top_k",
             "must be -1, 0 (disabled) or a positive integer")
        need(isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        need(isinstance(self.presence_penalty, (int, float)) and -2.0 <= self.presence_penalty <= 2.0,
             "presence_penalty", "must be in [-2, 2]")
        need(isinstance(self.frequency_penalty, (int, float)) and -2.0 <= self.frequency_penalty <= 2.0,
             "frequency_penalty", "must be in [-2, 2]")
        need(isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty <= 10.0,
             "repetition_penalty", "must be in (0, 10]")
        need(self.seed is None or is_int(self.seed), "seed", "must be an integer")
        need(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "must be a non-empty string or a list of non-empty strings")
        need(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        need(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", "must be a list of token ids")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        need(self.prompt_logprobs is None
             or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS), "prompt_logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        need(self.structured is None or isinstance(self.structured, GrammarSpec), "structured", "must be a GrammarSpec")
        need(isinstance(self.logit_bias, dict) and all(is_int(t) and t >= 0 and isinstance(b, (int, float))
                                                       and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "logit_bias", "must map token ids to biases between -100 and 100")
        need(len(self.logit_bias) <= 300, "logit_bias", "may hold at most 300 tokens")
        self.temperature = float(self.temperature)
