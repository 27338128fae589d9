"""Prompt building and the synchronous generation helpers behind `generate` and `render`."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Iterator

from .scheduler import Event, Request, Scheduler


def read_json_file(path: str | Path, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what}: {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {path}: not valid JSON ({exc})") from None


def load_messages(path: str | Path) -> list[dict]:
    """A chat file is a list of {role, content} messages, or an object with a "messages" list."""
    data = read_json_file(path, "--chat")
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"--chat: {path}: expected a non-empty list of messages (or {{\"messages\": [...]}})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"--chat: {path}: messages[{i}] needs a 'role'")
    return messages


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
    return tokenizer.render_chat(load_messages(chat), tools=load_list(tools, "--tools"),
                                 documents=load_list(documents, "--documents"), add_generation_prompt=True)


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
