"""Constrained decoding: what a front end asks for (:class:`ConstraintSpec`) and how it is compiled.

Front ends (fmaas gRPC, chat gRPC, OpenAI HTTP) build a ``ConstraintSpec`` and put it on
``Request.constraint``; the scheduler compiles it with :func:`compile_constraint` and applies
a per-sequence token mask before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidField

KINDS = ("json", "json_schema", "regex", "choice", "grammar", "tool_call")


@dataclass(frozen=True)
class ConstraintSpec:
    """One request's output constraint.

    ``kind``: ``"json"`` (any JSON object), ``"json_schema"`` (``value`` = the schema as JSON
    text), ``"regex"`` (``value`` = the pattern), ``"choice"`` (``choices``), ``"grammar"``
    (``value`` = a Lark grammar), ``"tool_call"`` (``tools`` = OpenAI-style tool dicts; with
    ``tool_name`` exactly that function is called once, without it one or more calls to any
    of ``tools`` — tool_choice "required").
    ``field`` is the caller's name for the field (``response_format``, ``params.decoding``)
    used in error messages.
    """

    kind: str  # "json" | "json_schema" | "regex" | "choice" | "grammar" | "tool_call"
    value: str | None = None
    choices: tuple[str, ...] = ()
    tools: tuple[dict, ...] = ()
    tool_name: str | None = None
    field: str = ""


def compile_constraint(spec: ConstraintSpec, tokenizer):
    """Compile ``spec`` for ``tokenizer``; raises :class:`InvalidField` naming ``spec.field``."""
    if spec.kind not in KINDS:
        raise InvalidField(spec.field or "constraint", f"unknown constraint kind {spec.kind!r} (one of {', '.join(KINDS)})")
    raise NotImplementedError("constrained decoding is being implemented")
