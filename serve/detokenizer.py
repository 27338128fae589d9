"""Streaming detokenization that never shows half a character.

Byte-level BPE splits a multi-byte UTF-8 character (emoji, CJK) across tokens,
so decoding the tokens seen so far can end in U+FFFD until the rest arrives.
We use the prefix-offset / read-offset technique of vLLM and TGI: decode only a
short window of recent tokens, `ids[prefix_offset:]`, and compare it with the
decode of `ids[prefix_offset:read_offset]` (text already shown). Decoding a
window that starts a few tokens back, rather than at the new token, keeps
decoders that treat the first token specially (leading-space stripping)
consistent with a one-shot decode. Each step costs O(window), not O(length).

While the window's text ends in U+FFFD the tail may be an incomplete character,
so it is held back; text before that trailing run is already final (a complete
UTF-8 character never changes when more bytes follow) and is shown at once.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context tokens whose text was already shown
        self._read_offset = 0  # tokens before this are fully shown
        self._shown_past_read = 0  # chars shown beyond ids[:read_offset] (final text before a held U+FFFD)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became printable (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        start = len(prefix_text) + self._shown_past_read
        if not window_text.endswith(_REPLACEMENT):
            # Clean end: everything is final; slide the window forward.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._shown_past_read = 0
            return window_text[start:]
        # Possibly an incomplete character at the end: show only what precedes the trailing U+FFFD run.
        stable = window_text.rstrip(_REPLACEMENT)
        delta = stable[start:] if len(stable) > start else ""
        self._shown_past_read += len(delta)
        return delta

    def flush(self) -> str:
        """End of stream: whatever is still held back (a truly invalid tail stays U+FFFD, as in decode)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        delta = window_text[len(prefix_text) + self._shown_past_read :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._shown_past_read = 0
        return delta

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)
