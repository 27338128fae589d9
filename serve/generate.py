"""Prompt building and the synchronous generation helpers behind `generate` and `render`."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Iterator

from ..errors import InvalidField
from .scheduler import Event, Request, Scheduler
from .validation import validate_documents, validate_messages, validate_tools


def read_json_file(path: str | Path, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidField(what, f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidField(what, f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidField(what, f"{path}: not valid JSON ({exc})") from None


def load_messages(path: str | Path) -> list[dict]:
    """A chat file is a list of {role, content} messages, or an object with a "messages" list."""
    data = read_json_file(path, "--chat")
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise InvalidField("--chat", f"{path}: expected a non-empty list of messages (or {{\"messages\": [...]}})")
    # the same checks as the server's and the client's (roles, content, tool calls, sizes)
    return validate_messages(messages, f"--chat: {path}: messages")


def load_list(path: str | Path | None, what: str) -> list | None:
    if path is None:
        return None
    data = read_json_file(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{what}: {path}: expected a JSON list")
    return data


def render_prompt(tokenizer, prompt: str | None = None, chat: str | Path | None = None,
                  tools: str | Path | None = None, documents: str | Path | None = None) -> str:
    """The exact text sent to the model: a raw prompt, or the chat rendered with the artifact's template."""
    if (prompt is None) == (chat is None):
        raise ValueError("give exactly one of --prompt or --chat")
    if prompt is not None:
        if tools or documents:
            raise ValueError("--tools/--documents need --chat (they are rendered by the chat template)")
        return prompt
    return tokenizer.render_chat(load_messages(chat), tools=validate_tools(load_list(tools, "--tools"), "--tools"),
                                 documents=validate_documents(load_list(documents, "--documents"), "--documents"),
                                 add_generation_prompt=True, time_limit_s=10.0, max_output_chars=64 << 20)


def stream(scheduler: Scheduler, request: Request) -> Iterator[Event]:
    """Submit a request and yield its events until the final one."""
    events: queue.Queue[Event] = queue.Queue()
    ticket = scheduler.submit(request, events.put)
    try:
        while True:
            event = events.get()
            yield event
            if event.kind == "final":
                return
    finally:
        ticket.cancel()  # a consumer that stops early frees the slot
