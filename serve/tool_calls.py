"""Granite tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

The model may emit several blocks in a row and sometimes writes `arguments` as
a JSON-encoded string; both are normalised to an object. A block that is not
valid (bad JSON, no name, no closing tag) is never fatal: it stays in the text
content, verbatim, and is listed in `malformed` so the caller can flag it.

Whitespace touching a *valid* block (the newline the model puts between
blocks, or before the first one) is dropped from the content, so a reply made
only of tool calls has empty content. The streaming parser follows exactly the
same rules, so its output over any split of the text equals `parse_tool_calls`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: dict
    raw: str  # the whole block, tags included, as the model wrote it


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @property
    def has_malformed(self) -> bool:
        return bool(self.malformed)


def parse_block(raw: str) -> list[ToolCall] | None:
    """Tool calls in one `<tool_call>...</tool_call>` block, or None when it is malformed."""
    body = raw[len(OPEN_TAG) : len(raw) - len(CLOSE_TAG)].strip()
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    items = payload if isinstance(payload, list) else [payload]  # some variants put a list in one block
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = item.get("name")
        args = item.get("arguments", {})
        if not isinstance(name, str) or not name:
            return None
        if args is None:
            args = {}
        if isinstance(args, str):  # arguments as a JSON-encoded string
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(name=name, arguments=args, raw=raw))
    return calls or None


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split a complete model reply into content and tool calls."""
    parser = ToolCallStreamParser()
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    return ParsedOutput(content=content + tail, tool_calls=calls + more, malformed=list(parser.malformed))


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStreamParser:
    """Incremental tool-call parsing over text deltas.

    Text is shown as soon as it cannot be part of a tool call; from `<tool_call>`
    on it is held until `</tool_call>`, then comes out as a ToolCall (or, if
    malformed, as the raw text). Trailing whitespace is held briefly, because it
    is dropped if a valid block follows.
    """

    def __init__(self):
        self._buf = ""  # unconsumed text: a partial open tag, or an open block
        self._in_block = False
        self._pending_ws = ""  # whitespace before a possible block
        self._after_call = False  # drop whitespace right after a valid block
        self.tool_calls: list[ToolCall] = []
        self.malformed: list[str] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        out: list[str] = []
        calls: list[ToolCall] = []
        while self._buf:
            if self._in_block:
                end = self._buf.find(CLOSE_TAG)
                if end < 0:
                    break  # wait for the closing tag
                raw = self._buf[: end + len(CLOSE_TAG)]
                self._buf = self._buf[end + len(CLOSE_TAG) :]
                self._in_block = False
                parsed = parse_block(raw)
                if parsed is None:
                    self.malformed.append(raw)
                    self._emit(out, raw)
                else:
                    self._pending_ws = ""
                    self._after_call = True
                    calls.extend(parsed)
                continue
            start = self._buf.find(OPEN_TAG)
            if start >= 0:
                self._emit(out, self._buf[:start])
                self._buf = self._buf[start:]
                self._in_block = True
                continue
            keep = _partial_tag_suffix(self._buf, OPEN_TAG)  # maybe the start of "<tool_call>"
            self._emit(out, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            break
        self.tool_calls.extend(calls)
        return "".join(out), calls

    def _emit(self, out: list[str], text: str) -> None:
        # Text outside blocks: leading whitespace after a valid call is dropped; trailing whitespace waits.
        if not text:
            return
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if body:
            out.append(self._pending_ws + body)
            self._pending_ws = ""
        self._pending_ws += text[len(body) :]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of stream: flush held text; an unterminated block comes back as text and is flagged."""
        out: list[str] = []
        if self._in_block:
            self.malformed.append(self._buf)
            self._emit(out, self._buf)
        elif self._buf:
            self._emit(out, self._buf)
        self._buf = ""
        self._in_block = False
        out.append(self._pending_ws)  # trailing whitespace after plain text is real content
        self._pending_ws = ""
        return "".join(out), []
