"""DeepSeek-R1's reasoning block: `<think>…</think>` split out of the generated text.

Contract: `ReasoningParser(starts_inside)` follows one completion. `feed(delta)` returns
(reasoning, content) text deltas; `finish()` returns what was held back. The block may open
with `<think>` in the output, or already be open when the chat template wrote `<think>` into
the prompt (`starts_inside`, see `prompt_opens_reasoning`). Text before the block that cannot
begin `<think>` means there is no block: everything is content. The whitespace DeepSeek-R1
writes right after `</think>` is not content. A block never closed is all reasoning.
"""

from __future__ import annotations

from moeray.platform.parsers.holdback import partial_tag_length

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside a reasoning block (a template that writes
    `<think>\\n` after the assistant tag, as DeepSeek-R1's does)."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)


class ReasoningParser:
    def __init__(self, starts_inside: bool = False):
        self._state = "reasoning" if starts_inside else "before"
        self._pending = ""  # text not yet assigned to either side

    def feed(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        reasoning = content = ""
        while True:
            if self._state == "before":
                stripped = self._pending.lstrip()
                if stripped.startswith(OPEN):
                    self._pending, self._state = stripped[len(OPEN):], "reasoning"
                    continue
                if OPEN.startswith(stripped):
                    return reasoning, content  # maybe the tag, still arriving
                self._state = "content"
                continue
            if self._state == "reasoning":
                at = self._pending.find(CLOSE)
                if at == -1:
                    keep = partial_tag_length(self._pending, CLOSE)
                    reasoning += self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    return reasoning, content
                reasoning += self._pending[:at]
                self._pending, self._state = self._pending[at + len(CLOSE):], "after"
                continue
            if self._state == "after":  # drop the whitespace between the block and the answer
                self._pending = self._pending.lstrip()
                if not self._pending:
                    return reasoning, content
                self._state = "content"
                continue
            content += self._pending
            self._pending = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            return pending, ""
        return "", pending if self._state != "after" else ""
