"""Cache-aware routing of the ingress's calls to the model replicas (`routing.policy: prefix_cache`).

Contract: `PromptPrefixRouter` is Ray Serve's `PrefixCacheAffinityRouter` (a prefix tree of what
each replica was sent; the replica with the longest match while the replicas' queues differ by
less than `imbalanced_threshold`, power-of-two otherwise) reading a moeray `GenerateRequest`:
the chat messages' text, the prompt text, or a token-id prompt as its decimal ids. Calls that
carry no request (stats) are routed by power-of-two.

Why a subclass: Ray's router takes the first argument attribute named `messages` or `prompt`,
and a `GenerateRequest` has both, one of them None. The class comes from its module rather than
the public `ray.serve.llm.request_router`, whose package imports vLLM or SGLang.
"""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from moeray.platform.service import GenerateRequest


class PromptPrefixRouter(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request) -> str | None:
        for arg in pending_request.args:
            if isinstance(arg, GenerateRequest):
                if arg.messages is not None:
                    return self._normalize_prompt_to_string(arg.messages)
                if isinstance(arg.prompt, str):
                    return arg.prompt
                return " ".join(map(str, arg.prompt)) if arg.prompt else None
        return None  # None: Ray's router falls back to power-of-two
