"""Constrained decoding: what a front end asks for (:class:`ConstraintSpec`) and how it is applied.

Front ends (fmaas gRPC, chat gRPC, OpenAI HTTP) build a ``ConstraintSpec`` and put it on
``Request.constraint``; ``Scheduler.submit`` compiles it (:func:`compile_constraint`, cached by
hash, time-limited, :class:`~granite_deploy.errors.InvalidField` naming ``spec.field`` before any
token is generated) and every step the sequence's token mask is applied before sampling.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (Rust, no torch,
no transformers; numpy bitmasks). Its tokenizer is built from the artifact's ``tokenizer.json``
through the ``tokenizers`` library, so Granite's added tokens are in the vocabulary: special
tokens (``<|end_of_text|>`` ...) can never be produced by a text grammar, while the non-special
``<tool_call>`` / ``</tool_call>`` tokens are referenced by id in the tool-call grammar.

Masks for the next token are computed off the critical path: :class:`MaskFiller` starts the fill
for every constrained row that will sample in a step on a worker thread (llguidance drops the GIL,
and its executor fills rows in parallel) while the engine runs that step; the scheduler waits for
it only after the logits are back.

Kinds (``ConstraintSpec.kind``):

- ``json``: any JSON object.
- ``json_schema``: ``value`` is the schema as JSON text (the draft 2020-12 subset llguidance
  implements; a keyword it does not implement is refused, never ignored).
- ``regex``: ``value`` is a regular expression (Rust ``regex`` syntax) the whole output matches.
- ``choice``: the output is exactly one of ``choices``.
- ``grammar``: ``value`` is a Lark grammar (llguidance's variant, ``start`` rule; GBNF is
  accepted too).
- ``tool_call``: Granite 4.0 tool calls, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  with the arguments matching the function's ``parameters`` schema. ``tool_name`` set: exactly
  one call of that function (tool_choice named); unset: one or more calls of any of ``tools``,
  one per line (tool_choice "required"). Object schemas that leave ``additionalProperties`` open
  are closed (OpenAI's strict function calling): a call carries exactly the declared arguments.
- ``no_tool_call``: free text that never contains ``<tool_call>`` (tool_choice "none").

JSON is generated compactly in the separators Granite's chat template writes (``", "``,
``": "``; no other whitespace), so it parses with ``json.loads`` and reads like the model's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidField

KINDS = ("json", "json_schema", "regex", "choice", "grammar", "tool_call", "no_tool_call")

COMPILE_TIMEOUT_S = 5.0  # wall-clock limit on one grammar compilation
CACHE_SIZE = 256  # compiled constraints kept (LRU), per process
MAX_SPEC_BYTES = 1 << 20  # a schema / regex / grammar larger than this is refused

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
# Granite's chat template writes JSON with Python's json.dumps separators (tojson).
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@dataclass(frozen=True)
class ConstraintSpec:
    """One request's output constraint (see the module docstring for the kinds).

    ``value``: the schema JSON text / regex / Lark grammar; ``choices``: the allowed outputs;
    ``tools``: OpenAI-style tool dicts (``{"type": "function", "function": {"name", "parameters"}}``,
    or the bare function dicts); ``tool_name``: the one function to call (None: any, one or
    more times). ``field`` is the caller's name for the field (``response_format``,
    ``params.decoding.json_schema``), used in every error message.
    """

    kind: str  # "json" | "json_schema" | "regex" | "choice" | "grammar" | "tool_call" | "no_tool_call"
    value: str | None = None
    choices: tuple[str, ...] = ()
    tools: tuple[dict, ...] = ()
    tool_name: str | None = None
    field: str = ""


def _llg():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (bitmask helpers)
    except ImportError as exc:  # pragma: no cover - the serve extra installs it
        raise InvalidField("constraint", f"constrained decoding needs the llguidance package ({exc})") from None
    return llguidance


# ============================================================================ tokenizer

class GrammarTokenizer:
    """llguidance's view of the served tokenizer, with the engine's vocabulary size."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        llg = _llg()
        backend = _backend(tokenizer)
        n = int(vocab_size or backend.get_vocab_size(with_added_tokens=True))
        eos = sorted(int(i) for i in (getattr(tokenizer, "stop_token_ids", None) or ()) if 0 <= int(i) < n)
        self.vocab_size = n
        self.words = (n + 31) // 32
        self.eos_token_ids = tuple(eos)
        self.ll = llg.LLTokenizer(backend.to_str(), n_vocab=n, eos_token=eos or None)
        self.open_id = _single_token(backend, OPEN_TAG, n)
        self.close_id = _single_token(backend, CLOSE_TAG, n)
        self.key = hashlib.sha256(backend.to_str().encode() + repr((n, eos)).encode()).hexdigest()[:16]


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind the serving tokenizer (or the tokenizer itself)."""
    for attr in ("backend_tokenizer", "_tok"):
        inner = getattr(tokenizer, attr, None)
        if inner is not None and hasattr(inner, "to_str"):
            return inner
    if hasattr(tokenizer, "to_str"):
        return tokenizer
    raise TypeError(f"{type(tokenizer).__name__} carries no tokenizers.Tokenizer for the grammar engine")


def _single_token(backend, text: str, n: int) -> int | None:
    tid = backend.token_to_id(text)
    return tid if tid is not None and tid < n else None


_tokenizers: "weakref.WeakKeyDictionary[object, dict[int | None, GrammarTokenizer]]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer, vocab_size: int | None = None) -> GrammarTokenizer:
    """The (cached) :class:`GrammarTokenizer` for a serving tokenizer; ~0.6 s to build at 100k tokens."""
    if isinstance(tokenizer, GrammarTokenizer):
        return tokenizer
    with _tokenizers_lock:
        per = _tokenizers.setdefault(tokenizer, {})
        gt = per.get(vocab_size)
        if gt is None:
            gt = per[vocab_size] = GrammarTokenizer(tokenizer, vocab_size)
        return gt


# ============================================================================ spec -> grammar

def _bad(spec: ConstraintSpec, problem: str, sub: str = "") -> InvalidField:
    name = spec.field or "constraint"
    return InvalidField(f"{name}.{sub}" if sub else name, problem)


def _json_object(spec: ConstraintSpec, text: str | None, what: str) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise _bad(spec, f"{what} is empty")
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise _bad(spec, f"{what} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _bad(spec, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(obj, (dict, bool)):
        raise _bad(spec, f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj if isinstance(obj, dict) else ({} if obj else {"not": {}})


def _with_options(schema: dict) -> dict:
    guidance = dict(schema.get("x-guidance") or {})
    for k, v in _JSON_OPTIONS.items():
        guidance.setdefault(k, v)
    return {**schema, "x-guidance": guidance}


def _closed(schema):
    """The schema with ``additionalProperties: false`` wherever an object schema leaves it open
    (OpenAI's strict function calling): a tool call then carries exactly the declared arguments."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "$defs", "definitions", "dependentSchemas") and isinstance(v, dict):
            out[k] = {name: _closed(sub) for name, sub in v.items()}
        elif k in ("items", "additionalItems", "contains", "not", "if", "then", "else", "anyOf", "oneOf",
                   "allOf", "prefixItems"):
            out[k] = _closed(v)
        else:
            out[k] = v
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _tool_functions(spec: ConstraintSpec) -> list[tuple[str, dict]]:
    if not spec.tools:
        raise _bad(spec, "no tools were given to call")
    out = []
    for i, tool in enumerate(spec.tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise _bad(spec, "has no function name", f"tools[{i}]")
        params = fn.get("parameters")
        if params is None or params == {}:
            params = {"type": "object"}
        if isinstance(params, str):
            params = _json_object(spec, params, f"tools[{i}] parameters")
        if not isinstance(params, dict):
            raise _bad(spec, "parameters must be a JSON schema object", f"tools[{i}]")
        out.append((name, params))
    return out


def _tool_call_lark(spec: ConstraintSpec, gt: GrammarTokenizer) -> str:
    functions = _tool_functions(spec)
    if spec.tool_name is not None:
        chosen = [(n, p) for n, p in functions if n == spec.tool_name]
        if not chosen:
            names = ", ".join(repr(n) for n, _ in functions)
            raise _bad(spec, f"calls {spec.tool_name!r}, which is not one of the given tools ({names})")
        functions = chosen[:1]
    variants = [{
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": _closed(params)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for name, params in functions]
    call_schema = _with_options(variants[0] if len(variants) == 1 else {"anyOf": variants})
    # the tags as the single vocabulary tokens the model knows, where the tokenizer has them
    open_tag = f"<[{gt.open_id}]>" if gt.open_id is not None else json.dumps(OPEN_TAG)
    close_tag = f"<[{gt.close_id}]>" if gt.close_id is not None else json.dumps(CLOSE_TAG)
    start = "start: call" if spec.tool_name is not None else 'start: call ("\\n" call)*'
    return f'{start}\ncall: {open_tag} "\\n" %json {json.dumps(call_schema)} "\\n" {close_tag}\n'


def grammar_text(spec: ConstraintSpec, gt: GrammarTokenizer) -> str:
    """The llguidance grammar (its JSON form) for ``spec``; raises InvalidField for a bad spec."""
    llg = _llg()
    kind = spec.kind
    if kind not in KINDS:
        raise _bad(spec, f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == "json":
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(_with_options({"type": "object"})))
    if kind == "json_schema":
        schema = _json_object(spec, spec.value, "the JSON schema")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(_with_options(schema)))
        except ValueError as exc:
            raise _bad(spec, f"invalid JSON schema: {exc}") from None
    if kind in ("regex", "grammar"):
        what = "the regular expression" if kind == "regex" else "the grammar"
        if not isinstance(spec.value, str) or not spec.value:
            raise _bad(spec, f"{what} is empty")
        if len(spec.value.encode()) > MAX_SPEC_BYTES:
            raise _bad(spec, f"{what} is larger than {MAX_SPEC_BYTES} bytes")
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        try:
            return llg.grammar_from("grammar", spec.value)  # Lark, or GBNF (converted)
        except Exception as exc:  # the GBNF converter raises plain exceptions
            raise _bad(spec, f"invalid grammar: {exc}") from None
    if kind == "choice":
        choices = list(spec.choices)
        if not choices:
            raise _bad(spec, "no choices given")
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise _bad(spec, "must be a non-empty string", f"choices[{i}]")
        alternatives = " | ".join(json.dumps(c) for c in dict.fromkeys(choices))
        return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    if kind == "tool_call":
        return llg.LLMatcher.grammar_from_lark(_tool_call_lark(spec, gt))
    # no_tool_call: any text without the opening tag (neither as its token nor spelled out)
    return llg.LLMatcher.grammar_from_lark(
        "start: TEXT\nTEXT: /(.|\\n)*/ & ~/(.|\\n)*" + OPEN_TAG + "(.|\\n)*/\n")


# ============================================================================ compiled constraints

class CompiledConstraint:
    """A compiled grammar: :meth:`new_state` gives each sequence its own matcher (a cheap copy)."""

    def __init__(self, spec: ConstraintSpec, gt: GrammarTokenizer, matcher, key: str):
        self.spec, self.tokenizer, self._template, self.key = spec, gt, matcher, key
        self._lock = threading.Lock()

    def new_state(self) -> "ConstraintState":
        with self._lock:  # deep_copy reads the template; never concurrently
            return ConstraintState(self._template.deep_copy(), self.tokenizer)


class ConstraintState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, gt: GrammarTokenizer):
        self.matcher, self.tokenizer = matcher, gt
        self.error = ""

    def consume(self, token_id: int) -> bool:
        """Advance past a sampled token; False (and ``error`` set) if the grammar rejects it."""
        if not self.matcher.consume_token(int(token_id)):
            self.error = self.matcher.get_error() or f"token {token_id} is not allowed here"
            return False
        return True

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may still continue)."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Complete, and nothing but EOS can follow: the sequence ends here."""
        return self.matcher.is_stopped()

    def fill(self, bitmask_row: np.ndarray) -> None:
        """Write the next-token bitmask into ``bitmask_row`` (int32 ``[words]``)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.ctypes.data, bitmask_row.nbytes)

    def allowed(self) -> np.ndarray:
        """The next-token mask as bool ``[vocab]`` (computed now, on this thread)."""
        row = np.empty(self.tokenizer.words, np.int32)
        self.fill(row)
        return unpack_mask(row, self.tokenizer.vocab_size)


def unpack_mask(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 bitmask (bit i of word i//32 = token i) -> bool ``[vocab_size]``."""
    return np.unpackbits(row.view(np.uint8), count=vocab_size, bitorder="little").view(np.bool_)


_cache: "OrderedDict[tuple[str, str], CompiledConstraint]" = OrderedDict()
_cache_lock = threading.Lock()
_compile_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="granite-grammar")


def _spec_key(spec: ConstraintSpec) -> str:
    tools = json.dumps(list(spec.tools), sort_keys=True, default=str)
    raw = json.dumps([spec.kind, spec.value, list(spec.choices), tools, spec.tool_name])
    return hashlib.sha256(raw.encode()).hexdigest()


def _build(grammar: str, gt: GrammarTokenizer):
    llg = _llg()
    matcher = llg.LLMatcher(gt.ll, grammar, log_level=0)
    return matcher, matcher.get_error() if matcher.is_error() else ""


def compile_constraint(spec: ConstraintSpec, tokenizer, vocab_size: int | None = None,
                       timeout_s: float = COMPILE_TIMEOUT_S) -> CompiledConstraint:
    """Compile ``spec`` for ``tokenizer`` (a serving tokenizer or a :class:`GrammarTokenizer`).

    Cached by the spec's hash and the tokenizer; raises :class:`InvalidField` naming
    ``spec.field`` for a bad schema / regex / grammar (the library's reason in the message) or a
    compilation that takes longer than ``timeout_s``.
    """
    if not isinstance(spec, ConstraintSpec):
        raise InvalidField("constraint", f"expected a ConstraintSpec, got {type(spec).__name__}")
    gt = grammar_tokenizer(tokenizer, vocab_size)
    key = (gt.key, _spec_key(spec))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit if hit.spec.field == spec.field else CompiledConstraint(spec, gt, hit._template, hit.key)
    grammar = grammar_text(spec, gt)
    future = _compile_pool.submit(_build, grammar, gt)
    try:
        matcher, error = future.result(timeout=timeout_s)
    except FutureTimeout:
        raise _bad(spec, f"the constraint took longer than {timeout_s:g} s to compile (simplify it)") from None
    if error:
        raise _bad(spec, _reason(spec, error))
    compiled = CompiledConstraint(spec, gt, matcher, key[1])
    with _cache_lock:
        _cache[key] = compiled
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


def _reason(spec: ConstraintSpec, error: str) -> str:
    what = {"json": "JSON", "json_schema": "invalid JSON schema", "regex": "invalid regular expression",
            "grammar": "invalid grammar", "choice": "invalid choices", "tool_call": "invalid tool parameters schema",
            "no_tool_call": "grammar"}[spec.kind]
    return f"{what}: {error.strip()}"


# ============================================================================ masks off the critical path

_BIAS = np.array([-np.inf, 0.0], np.float32)  # bit 0 -> -inf, bit 1 -> 0


class MaskFiller:
    """Computes next-token masks for many sequences on a worker thread.

    ``start(states)`` returns at once; ``result()`` of the returned future is one float32
    ``[vocab]`` array of additive biases (0 allowed, -inf not) per state, or None for a state
    that allows no token. llguidance releases the GIL while it fills, so the fill
    runs while the engine step runs on the caller's thread.
    """

    def __init__(self, threads: int | None = None):
        llg = _llg()
        n = threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._executor = llg.LLExecutor(n)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="granite-mask")
        self._out: list[np.ndarray] | None = None
        self._turn = 0

    def start(self, states: list[ConstraintState]) -> Future:
        return self._pool.submit(self._fill, list(states))

    def _fill(self, states: list[ConstraintState]) -> np.ndarray:
        import llguidance.numpy as lnp

        gt = states[0].tokenizer
        bits = np.empty((len(states), gt.words), np.int32)
        if len(states) == 1:
            states[0].fill(bits[0])
        else:
            lnp.fill_next_token_bitmask_par(self._executor, [(s.matcher, i) for i, s in enumerate(states)], bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, count=gt.vocab_size, bitorder="little").view(np.bool_)
        # as additive biases (0 / -inf): applying one to the logits is then a single add on the
        # critical path instead of a masked copy. A row that allows nothing comes back as None
        # (the scheduler then asks its matcher why).
        n = len(states)
        if self._out is None or self._out[0].shape[0] < n or self._out[0].shape[1] != gt.vocab_size:
            self._out = [np.empty((max(n, 8), gt.vocab_size), np.float32) for _ in range(2)]
        # two buffers in turn: the scheduler is done with step k's rows before step k+2's fill
        self._turn ^= 1
        biases = np.take(_BIAS, allowed.view(np.uint8), out=self._out[self._turn][:n])
        nonempty = bits.any(axis=1)
        return [biases[i] if nonempty[i] else None for i in range(len(states))]

    def close(self) -> None:
        self._pool.shutdown(wait=True)



# ============================================================================ OpenAI-shaped requests

def strict_schema(schema_text: str, field: str = "") -> str:
    """OpenAI's ``strict: true``: the schema with every open object schema closed
    (``additionalProperties: false``); the text unchanged when it is not a JSON object."""
    try:
        schema = json.loads(schema_text)
    except (TypeError, ValueError):
        return schema_text  # compile_constraint reports it, with the field
    return json.dumps(_closed(schema)) if isinstance(schema, dict) else schema_text


def openai_constraint(response_format=None, tool_choice=None, tools=None, *,
                      field_prefix: str = "") -> ConstraintSpec | None:
    """The ConstraintSpec for OpenAI-shaped ``response_format`` / ``tool_choice`` (None: free text).

    ``response_format``: ``{"type": "text" | "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``, or the extensions
    ``{"type": "regex", "regex": ...}``, ``{"type": "choice", "choices": [...]}``,
    ``{"type": "grammar", "grammar": ...}``. ``tool_choice``: ``None`` / ``"auto"``, ``"none"``,
    ``"required"`` or ``{"type": "function", "function": {"name": ...}}``; ``tools`` the
    request's OpenAI tool list. Errors name ``field_prefix + "response_format..."`` /
    ``"tool_choice..."``.
    """
    rf_field, tc_field = f"{field_prefix}response_format", f"{field_prefix}tool_choice"
    tools = tuple(tools or ())
    forced: ConstraintSpec | None = None
    forbid = False
    if tool_choice is None or tool_choice == "auto":
        pass
    elif tool_choice == "none":
        forbid = bool(tools)
    elif tool_choice == "required" or isinstance(tool_choice, dict):
        name = None
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if tool_choice.get("type", "function") != "function" or not isinstance(name, str) or not name:
                raise InvalidField(tc_field, 'a named choice is {"type": "function", "function": {"name": ...}}')
        if not tools:
            raise InvalidField(tc_field, "forces a tool call but the request has no tools")
        forced = ConstraintSpec("tool_call", tools=tools, tool_name=name, field=tc_field)
    else:
        raise InvalidField(tc_field, f'must be "auto", "none", "required" or a named function, got {tool_choice!r}')

    spec = None
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise InvalidField(rf_field, "must be an object with a type")
        kind = response_format.get("type", "text")
        if kind == "text":
            spec = None
        elif kind == "json_object":
            spec = ConstraintSpec("json", field=rf_field)
        elif kind == "json_schema":
            js = response_format.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise InvalidField(f"{rf_field}.json_schema", "must be an object with a schema")
            schema = js["schema"]
            text = schema if isinstance(schema, str) else json.dumps(schema)
            if js.get("strict"):
                text = strict_schema(text)
            spec = ConstraintSpec("json_schema", text, field=f"{rf_field}.json_schema.schema")
        elif kind in ("regex", "grammar"):
            spec = ConstraintSpec(kind, response_format.get(kind), field=f"{rf_field}.{kind}")
        elif kind == "choice":
            choices = response_format.get("choices")
            if not isinstance(choices, (list, tuple)):
                raise InvalidField(f"{rf_field}.choices", "must be a list of strings")
            spec = ConstraintSpec("choice", choices=tuple(choices), field=f"{rf_field}.choices")
        else:
            raise InvalidField(f"{rf_field}.type", "must be one of text, json_object, json_schema, regex, "
                               f"choice, grammar; got {kind!r}")
    if forced is not None:
        if spec is not None:
            raise InvalidField(rf_field, "cannot be combined with a tool_choice that forces a tool call")
        return forced
    if spec is None and forbid:
        return ConstraintSpec("no_tool_call", field=tc_field)
    return spec


def warm_up(tokenizer, vocab_size: int | None = None) -> threading.Thread:
    """Build the grammar tokenizer on a background thread (~1 s at 100k tokens), so the first
    constrained request does not pay for it; a tokenizer the grammar engine cannot read is
    left alone (constrained requests then report why)."""
    def build():
        try:
            grammar_tokenizer(tokenizer, vocab_size)
        except Exception:  # noqa: BLE001 - reported by compile_constraint when a request needs it
            pass

    thread = threading.Thread(target=build, name="granite-grammar-tokenizer", daemon=True)
    thread.start()
    return thread


def precompile(spec: ConstraintSpec | None, scheduler) -> None:
    """Compile ``spec`` for ``scheduler`` now (front ends call this in a worker thread, so that
    ``Scheduler.submit``, which runs on the event loop, finds it in the cache)."""
    if spec is not None and scheduler is not None:
        compile_constraint(spec, scheduler.tokenizer, scheduler.engine.info.vocab_size)
