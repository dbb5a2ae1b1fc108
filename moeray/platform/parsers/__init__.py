"""Incremental parsers of generated text: reasoning blocks and tool-call markup.

Both take text deltas as the detokenizer produces them (a tag may arrive split over any number
of deltas) and hold back only what could still turn out to be the start of a tag.
"""
