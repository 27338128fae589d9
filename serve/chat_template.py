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
import inspect
import json
import re
import types
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

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
    env = ImmutableSandboxedEnvironment(
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
# Python functions as tools (mirrors transformers.utils.get_json_schema)
# --------------------------------------------------------------------------------------------

_JSON_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BASIC = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null",
          list: "array", tuple: "array", dict: "object"}
_description_re = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_args_re = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_args_split_re = re.compile(
    r"""
(?:^|\n)
([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*
(.*?)\s*
(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)
""",
    re.DOTALL | re.VERBOSE,
)
_returns_re = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)


def _enum_schema(values: list) -> dict:
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint) -> dict:
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        values = [m.value for m in hint]
        if not values or any(type(v) not in _JSON_SCALARS for v in values):
            raise ChatTemplateError(f"Enum {hint.__name__} cannot be written as a JSON schema enum")
        return _enum_schema(values)
    if origin is None:
        if hint is Any:
            return {}
        if hint in _BASIC:
            return {"type": _BASIC[hint]}
        raise ChatTemplateError(f"Couldn't convert the type hint {hint!r} to a JSON schema")
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        subs = [_hint_schema(t) for t in args if t is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise ChatTemplateError("Only the valid python literals can be listed in typing.Literal.")
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise ChatTemplateError(f"Tuple type hint {hint!r} is not converted to a JSON schema; use list[]")
        return {"type": "array", "prefixItems": [_hint_schema(t) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _hint_schema(args[1])
        return out
    raise ChatTemplateError(f"Couldn't parse the type hint {hint!r}")


def function_to_schema(func: Callable) -> dict:
    """OpenAI-style tool schema from type hints and a Google-style docstring (as transformers builds it)."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ChatTemplateError(f"Cannot generate JSON schema for {name} because it has no docstring!")
    doc = doc.strip()
    m = _description_re.search(doc)
    main_doc = m.group(1).strip() if m else None
    m = _args_re.search(doc)
    arg_docs = {}
    if m:
        block = "\n".join(line for line in m.group(1).split("\n") if line.strip())
        arg_docs = {g[1]: re.sub(r"\s*\n+\s*", " ", g[2].strip()) for g in _args_split_re.findall(block)}
    m = _returns_re.search(doc)
    return_doc = m.group(1).strip() if m else None

    hints = get_type_hints(func)
    sig = inspect.signature(func)
    first = next(iter(sig.parameters), None)
    implicit = first if first in {"self", "cls"} and sig.parameters[first].annotation == inspect.Parameter.empty else None
    required = []
    for pname, param in sig.parameters.items():
        if pname == implicit:
            continue
        if param.annotation == inspect.Parameter.empty:
            raise ChatTemplateError(f"Argument {pname} is missing a type hint in function {name}")
        if param.default == inspect.Parameter.empty:
            required.append(pname)
    properties = {}
    for pname, hint in hints.items():
        if pname == implicit:
            continue
        if pname == "return":
            try:
                properties[pname] = _hint_schema(hint)
            except ChatTemplateError:
                pass  # the model never produces the return value; an odd return hint is not fatal
        else:
            properties[pname] = _hint_schema(hint)
    params = {"type": "object", "properties": properties}
    if required:
        params["required"] = required

    return_schema = properties.pop("return", None)
    if return_schema is not None and return_doc is not None:
        return_schema["description"] = return_doc
    for arg, schema in properties.items():
        if arg not in arg_docs:
            raise ChatTemplateError(f"Cannot generate JSON schema for {name}: no docstring description for '{arg}'")
        desc = arg_docs[arg]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", desc, flags=re.IGNORECASE)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            desc = choices.string[: choices.start()].strip()
        schema["description"] = desc
    out = {"name": name, "description": main_doc, "parameters": params}
    if return_schema is not None:
        out["return"] = return_schema
    return {"type": "function", "function": out}


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
    **kwargs,
) -> str:
    """Render one conversation; same result as `tokenizer.apply_chat_template(..., tokenize=False)`.

    `special_tokens` is the tokenizer's named special tokens (bos_token, eos_token, ...); extra
    kwargs are template variables and override them, as in transformers.
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
            elif inspect.isfunction(tool) or inspect.ismethod(tool):
                tool_schemas.append(function_to_schema(tool))
            else:
                raise ChatTemplateError("Tools should be JSON schema dicts or functions with type hints and docstrings.")
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

    try:
        rendered = compiled.render(
            messages=chat,
            tools=_plain(tool_schemas),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **context,
        )
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
