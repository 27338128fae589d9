"""Python functions as tool schemas (mirrors transformers.utils.get_json_schema).

Only tests use this: the server takes tools as JSON schemas. It lived in
serve/chat_template.py; it is kept here so the chat-template tests can still
compare the rendering of function tools with transformers'.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Callable
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from granite_deploy.serve.chat_template import ChatTemplateError

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
