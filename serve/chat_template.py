"""Render an artifact's chat template exactly as transformers' apply_chat_template does.

The serving runtime installs without transformers, yet the prompt the model
sees must be byte-identical to what it was trained/evaluated with. So this
module mirrors transformers 5's `utils/chat_template_utils.py`: the same
sandboxed Jinja environment (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, the `{% generation %}` tag), the same globals and
filters (`tojson` without HTML escaping, `raise_exception`, `strftime_now`,
`dict`, a namespace that refuses dunder names), the same input clean-up
(None-valued message keys dropped, rich objects reduced to plain JSON data,
reasoning fields aliased) and the same template context (messages, tools,
documents, add_generation_prompt, the named special tokens, then extra kwargs).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render (including `raise_exception` in the template)."""


# --------------------------------------------------------------------------------------------
# Template environment
# --------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    # transformers registers `{% generation %}...{% endgeneration %}` to track assistant spans;
    # without the tag such templates would not even compile. Here it renders its body unchanged.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes `<`, `>`, `&` and `'`; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict(...)` for templates without exposing the dict type itself to attribute tricks.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces reject underscore-prefixed names so templates cannot reach CPython internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class TemplateLimitError(ChatTemplateError):
    """Rendering went past a time, size or memory limit (RESOURCE_EXHAUSTED, not a template bug)."""

    too_large = True


_limits = threading.local()  # per rendering thread: (deadline or None, max_chars or None)
_TEMPLATE_FILE = "<template>"  # the code filename Jinja gives templates compiled from a string


def _check_size(value: Any) -> Any:
    max_chars = getattr(_limits, "max_chars", None)
    if max_chars is not None and isinstance(value, (str, list, tuple)) and len(value) > max_chars:
        raise TemplateLimitError(f"chat template output is over the limit of {max_chars} characters")
    return value


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The transformers sandbox, plus size checks on `*`, `**` and `+` (so `'x' * 10**8`
    is refused before it is built; intercepted operators are also never constant-folded)."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator, left, right):
        max_chars = getattr(_limits, "max_chars", None)
        if operator == "*" and max_chars is not None:
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > max_chars:
                    raise TemplateLimitError(f"chat template output is over the limit of {max_chars} characters")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 4096 \
                and abs(left) > 1:
            raise TemplateLimitError(f"chat template computes a power too large ({left} ** {right})")
        return _check_size(super().call_binop(context, operator, left, right))


def _render_limited(compiled: jinja2.Template, variables: dict, time_limit_s: float | None,
                    max_chars: int | None) -> str:
    """Render with a deadline (checked on every executed template line, through a trace
    function on this thread only) and a bound on the output's length."""
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    lines = [0]

    def local_trace(frame, event, arg):
        if event == "line":
            lines[0] += 1
            if deadline is not None and not lines[0] & 63 and time.monotonic() > deadline:
                raise TemplateLimitError(f"chat template rendering took longer than {time_limit_s:g} s")
        return local_trace

    def global_trace(frame, event, arg):
        return local_trace if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    _limits.max_chars = max_chars
    sys.settrace(global_trace if deadline is not None else previous)
    try:
        out, size = [], 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            if max_chars is not None and size > max_chars:
                raise TemplateLimitError(f"chat template output is over the limit of {max_chars} characters")
            out.append(piece)
        return "".join(out)
    finally:
        sys.settrace(previous)
        _limits.max_chars = None


def _jinja_version_ok() -> bool:
    parts = []
    for piece in jinja2.__version__.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts) >= (3, 1, 6)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox transformers uses (cached per source string)."""
    if not _jinja_version_ok():
        # Older Jinja has known sandbox escapes; chat templates are untrusted code from the artifact.
        raise ChatTemplateError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}")
    env = _LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def select_template(templates: str | Mapping[str, str] | None, name: str | None = None, tools=None) -> str:
    """Pick the template source like transformers' get_chat_template (named set: tool_use/default)."""
    if isinstance(templates, Mapping):
        if name is not None and name in templates:
            return templates[name]
        if name is None:
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ChatTemplateError(
                f"the artifact has several chat templates and none is 'default': {sorted(templates)}"
            )
        return name  # a name that is not in the set is taken as a template source, as transformers does
    if name is not None:
        return name
    if templates is None:
        raise ChatTemplateError("the artifact has no chat template (tokenizer_config.json or chat_template.jinja)")
    return templates


# --------------------------------------------------------------------------------------------
# Input clean-up (mirrors _normalize_chat_messages, _plain_template_data, _alias_reasoning_fields)
# --------------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _to_dicts(value: Any) -> Any:
    # Message objects (dataclasses, pydantic models such as the OpenAI SDK's) become dicts.
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _normalize_messages(messages: Any) -> list[dict]:
    messages = _to_dicts(getattr(messages, "messages", messages))
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        # APIs send content=None / tool_calls=None; templates handle a missing key but may print "None".
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _plain(value: Any) -> Any:
    # Everything the sandbox sees is rebuilt from plain JSON types; anything else becomes "<TypeName>".
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())  # numpy scalars (numpy is not imported here)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list) -> list:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat_template(
    template: str,
    messages: Any,
    tools: list | None = None,
    documents: list | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    special_tokens: Mapping[str, str] | None = None,
    time_limit_s: float | None = None,
    max_output_chars: int | None = None,
    **kwargs,
) -> str:
    """Render one conversation; same result as `tokenizer.apply_chat_template(..., tokenize=False)`.

    `special_tokens` is the tokenizer's named special tokens (bos_token, eos_token, ...); extra
    kwargs are template variables and override them, as in transformers.

    `time_limit_s` / `max_output_chars` bound the work an untrusted template may do (loops,
    string repetition, huge output): past them it stops with :class:`TemplateLimitError`.
    """
    if isinstance(messages, (list, tuple)) and len(messages) == 0:
        raise ChatTemplateError("Cannot apply chat template to an empty conversation.")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt are not compatible.")
    compiled = compile_template(template)

    tool_schemas = None
    if tools is not None:
        tool_schemas = []
        for tool in tools:
            if isinstance(tool, dict):
                tool_schemas.append(tool)
            else:  # python functions: convert them with transformers.utils.get_json_schema first
                raise ChatTemplateError("Tools should be JSON schema dicts.")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ChatTemplateError("Documents should be a list of dicts with 'title' and 'text' keys!")

    context = _plain({**(special_tokens or {}), **kwargs})
    chat = _alias_reasoning(_plain(_normalize_messages(messages)))

    final_message = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise ChatTemplateError(f'continue_final_message is set but the final message has no "{field}"')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ChatTemplateError(f'continue_final_message is set to "{field}" but the template never reads it')
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message is set but the final message has no text block")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG

    variables = dict(messages=chat, tools=_plain(tool_schemas), documents=_plain(documents),
                     add_generation_prompt=add_generation_prompt, **context)
    try:
        if time_limit_s is None and max_output_chars is None:
            rendered = compiled.render(**variables)
        else:
            rendered = _render_limited(compiled, variables, time_limit_s, max_output_chars)
    except TemplateLimitError:
        raise
    except RecursionError:
        raise ChatTemplateError("chat template failed while rendering: recursion too deep "
                                "(a recursive macro or deeply nested input)") from None
    except MemoryError:
        raise TemplateLimitError("chat template failed while rendering: out of memory") from None
    except OverflowError as e:  # e.g. the sandbox refusing range(10**9)
        raise TemplateLimitError(f"chat template failed while rendering: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        # e.g. a template doing `'x' + message['content']` on a non-string: still the template's fault
        raise ChatTemplateError(f"chat template failed while rendering: {type(e).__name__}: {e}") from e

    if continue_final_message:
        # Cut the rendering right after the final message, so the model continues it.
        if final_message.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ChatTemplateError("continue_final_message is set but the template dropped the final message")
        loc = rendered.rindex(_CONTINUE_TAG.strip())
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:loc]
        else:
            rendered = rendered[:loc].rstrip()
    return rendered
