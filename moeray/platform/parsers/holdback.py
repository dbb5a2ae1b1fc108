"""The shared piece of incremental tag scanning: how much of a text's end could begin a tag."""

from __future__ import annotations


def partial_tag_length(text: str, *tags: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of one of `tags`: the part
    to hold back until the next delta tells whether it opens the tag."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:size]):
                longest = max(longest, size)
                break
    return longest
