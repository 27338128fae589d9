"""Request validation, in one place, for every front end (gRPC, HTTP, the CLI, the client).

Everything here raises :class:`~granite_deploy.errors.InvalidField` (or its
:class:`~granite_deploy.errors.TooLarge` subclass) naming the field as the
caller spelled it; each front end maps those classes to its own status
(gRPC INVALID_ARGUMENT / RESOURCE_EXHAUSTED, HTTP 400 / 413, exit 2).

* :func:`validate_request` - the generation parameters and prompt of a
  scheduler :class:`~.scheduler.Request` (the scheduler calls it once, on submit).
* :func:`validate_messages` - a chat conversation (roles, content, tool calls),
  shared by ``generate --chat``, the server and ``client``.
* :class:`InputLimits` / :func:`check_text_bytes` / :func:`check_json_depth` -
  the byte, item and depth limits checked before any tokenising or rendering.

This module imports nothing heavy (no grpc, no numpy, no tokenizers): the
client and the CLI import it freely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InvalidField, TooLarge

__all__ = [
    "ROLES", "InputLimits", "check_json_depth", "check_text_bytes", "parse_json_field", "rename",
    "validate_documents", "validate_messages", "validate_params", "validate_port", "validate_request",
    "validate_threads", "validate_tools",
]

ROLES = ("system", "user", "assistant", "tool")


# ============================================================================ field names

def rename(exc: InvalidField, names: Mapping[str, str] | None) -> InvalidField:
    """`exc` with its field renamed to the caller's spelling (``temperature`` ->
    ``parameters.sampling.temperature``); unchanged when `names` has no entry."""
    if names and exc.field in names:
        return exc.renamed(names[exc.field])
    return exc


def _as_invalid(exc: ValueError) -> InvalidField:
    """A ``ValueError("<field>: <problem>")`` from a params dataclass as an InvalidField."""
    if isinstance(exc, InvalidField):
        return exc
    field, sep, problem = str(exc).partition(": ")
    if sep and field and " " not in field:
        return InvalidField(field, problem)
    return InvalidField("", str(exc))


# ============================================================================ generation requests

def validate_params(sampling, stopping, names: Mapping[str, str] | None = None) -> None:
    """Check sampling and stopping parameters; InvalidField named by `names` (Python name -> wire path).

    Front ends call this before tokenising (a bad field is refused at once) and then submit
    with ``params_checked=True`` so the scheduler does not check them again."""
    try:
        sampling.validate()
        stopping.validate()
    except ValueError as exc:
        raise rename(_as_invalid(exc), names) from None


def validate_request(request, context_window: int, vocab_size: int | None = None,
                     params_checked: bool = False) -> None:
    """Check a scheduler Request: prompt length and ids, then (unless the front end already
    did, ``params_checked``) the sampling and stopping parameters.

    Raises InvalidField with the Python field name (``temperature``, ``prompt``); front ends
    rename it to their wire path with :func:`rename`.
    """
    ids = request.prompt_ids
    n = len(ids)
    if n == 0:
        raise InvalidField("prompt", "is empty (it must encode to at least one token)")
    if n >= context_window:
        raise InvalidField("prompt", f"{n} tokens does not fit the context window of {context_window} tokens "
                                     "(at least one token must remain to generate)")
    if vocab_size is not None and (max(ids) >= vocab_size or min(ids) < 0):
        raise InvalidField("prompt", f"token ids must be in [0, {vocab_size})")
    if not params_checked:
        validate_params(request.sampling, request.stopping)


# ============================================================================ input limits

@dataclass(frozen=True)
class InputLimits:
    """Limits checked before tokenising or rendering untrusted input (bytes are UTF-8 bytes).

    ``for_context(n)`` sizes the byte limits for a context window of n tokens: a token is
    rarely more than a few bytes, so 16 bytes a token (at least 1 MiB) leaves room for
    ``truncate_input_tokens`` while refusing a 5 MB prompt for a 4k-token model at once.
    """

    max_prompt_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 20  # one message's content
    max_messages: int = 1024
    max_conversation_bytes: int = 1 << 21  # all messages + tools + documents
    max_tools: int = 128
    max_tools_bytes: int = 1 << 20
    max_documents: int = 256
    max_documents_bytes: int = 1 << 21
    max_json_depth: int = 64
    template_time_s: float = 2.0
    max_rendered_bytes: int = 1 << 21

    @classmethod
    def for_context(cls, context_window: int, **overrides) -> "InputLimits":
        base = max(1 << 20, 16 * int(context_window))
        values = dict(max_prompt_bytes=base, max_message_bytes=base, max_conversation_bytes=2 * base,
                      max_tools_bytes=base, max_documents_bytes=2 * base, max_rendered_bytes=2 * base)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_text_bytes(text: str, limit: int, field: str) -> int:
    """Refuse `text` over `limit` UTF-8 bytes (TooLarge naming `field`); returns its size."""
    if not isinstance(text, str):
        raise InvalidField(field, f"must be a string, got {type(text).__name__}")
    if len(text) > limit:  # at least that many bytes: no need to encode
        raise TooLarge(field, f"is over {len(text)} bytes, the limit is {limit} bytes")
    # len(text) <= bytes <= 4 * len(text): encode only when the answer is not clear already
    size = _utf8_len(text) if len(text) * 4 > limit else len(text)
    if size > limit:
        raise TooLarge(field, f"is {size} bytes, the limit is {limit} bytes")
    return size


def check_json_depth(value: Any, limit: int, field: str) -> None:
    """Refuse JSON-like data nested deeper than `limit` (iterative: never a RecursionError)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            raise InvalidField(field, f"is nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def _text_depth(text: str) -> int:
    """The bracket nesting depth of JSON text (outside strings), without parsing it."""
    depth = best = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def parse_json_field(text: str, field: str, max_depth: int = 64, max_bytes: int | None = None) -> Any:
    """JSON text from a request field: InvalidField (never RecursionError) when malformed or too deep."""
    if max_bytes is not None:
        check_text_bytes(text, max_bytes, field)
    if _text_depth(text) > max_depth:
        raise InvalidField(field, f"is nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidField(field, f"not valid JSON ({exc})") from None


# ============================================================================ chat messages

def validate_messages(messages: Any, field: str = "messages", limits: InputLimits | None = None,
                      require_content: bool = True) -> list[dict]:
    """Check a conversation (a list of ``{"role", "content", ...}`` dicts) and return it.

    Roles must be one of :data:`ROLES`; ``content`` must be a string (an assistant message
    with ``tool_calls`` may leave it empty); ``tool_calls`` entries need a function name and
    object arguments. Field names in errors are ``{field}[i].role`` and so on.
    """
    limits = limits or InputLimits()
    if not isinstance(messages, (list, tuple)):
        raise InvalidField(field, f"must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise InvalidField(field, "is empty (give at least one message)")
    if len(messages) > limits.max_messages:
        raise TooLarge(field, f"has {len(messages)} messages, the limit is {limits.max_messages}")
    total = 0
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise InvalidField(where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidField(f"{where}.role", "is missing or empty")
        if role not in ROLES:
            raise InvalidField(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        calls = m.get("tool_calls")
        content = m.get("content")
        if content is None:
            if require_content and not (role == "assistant" and calls):
                raise InvalidField(f"{where}.content", "is missing")
        elif not isinstance(content, str):
            raise InvalidField(f"{where}.content", f"must be a string, got {type(content).__name__}")
        else:
            total += check_text_bytes(content, limits.max_message_bytes, f"{where}.content")
        if calls is not None:
            if role != "assistant":
                raise InvalidField(f"{where}.tool_calls", "only assistant messages carry tool calls")
            if not isinstance(calls, (list, tuple)):
                raise InvalidField(f"{where}.tool_calls", "must be a list")
            for j, c in enumerate(calls):
                fn = c.get("function", c) if isinstance(c, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn.get("name"):
                    raise InvalidField(f"{where}.tool_calls[{j}]", "needs a function name")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    args = parse_json_field(args, f"{where}.tool_calls[{j}].arguments", limits.max_json_depth)
                if not isinstance(args, Mapping):
                    raise InvalidField(f"{where}.tool_calls[{j}].arguments", "must be a JSON object")
                check_json_depth(args, limits.max_json_depth, f"{where}.tool_calls[{j}].arguments")
        if total > limits.max_conversation_bytes:
            raise TooLarge(field, f"the messages are over {limits.max_conversation_bytes} bytes together")
    return [dict(m) for m in messages]


def validate_tools(tools: Any, field: str = "tools", limits: InputLimits | None = None) -> list[dict] | None:
    """Tool definitions (OpenAI shape, or bare function schemas): a list of objects, within limits."""
    if tools is None:
        return None
    limits = limits or InputLimits()
    if not isinstance(tools, (list, tuple)):
        raise InvalidField(field, f"must be a list, got {type(tools).__name__}")
    if len(tools) > limits.max_tools:
        raise TooLarge(field, f"has {len(tools)} tools, the limit is {limits.max_tools}")
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping):
            raise InvalidField(f"{field}[{i}]", "must be an object")
        check_json_depth(t, limits.max_json_depth, f"{field}[{i}]")
    return [dict(t) for t in tools]


def validate_documents(documents: Any, field: str = "documents",
                       limits: InputLimits | None = None) -> list[dict] | None:
    """Documents for the chat template: a list of objects with string values, within limits."""
    if documents is None:
        return None
    limits = limits or InputLimits()
    if not isinstance(documents, (list, tuple)):
        raise InvalidField(field, f"must be a list, got {type(documents).__name__}")
    if len(documents) > limits.max_documents:
        raise TooLarge(field, f"has {len(documents)} documents, the limit is {limits.max_documents}")
    total = 0
    for i, d in enumerate(documents):
        if not isinstance(d, Mapping):
            raise InvalidField(f"{field}[{i}]", "must be an object")
        check_json_depth(d, limits.max_json_depth, f"{field}[{i}]")
        for key, value in d.items():
            if isinstance(value, str):
                total += check_text_bytes(value, limits.max_documents_bytes, f"{field}[{i}].{key}")
        if total > limits.max_documents_bytes:
            raise TooLarge(field, f"the documents are over {limits.max_documents_bytes} bytes together")
    return [dict(d) for d in documents]


# ============================================================================ CLI options

def validate_port(value: int, option: str, allow_zero: bool = True) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= 65535):
        raise InvalidField(option, f"must be a port number in {low}..65535, got {value!r}")
    return value


def validate_threads(value: int | None, option: str = "--threads") -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidField(option, f"must be an integer >= 1, got {value!r}")
    return value
