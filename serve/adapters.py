"""`serve BASE --adapter NAME=ADAPTER_ARTIFACT`: LoRA adapters as their own artifacts, one engine each.

An adapter artifact is the base checkpoint with a PEFT LoRA adapter merged in at export time
(`export --adapter PATH`, export/adapter.py). Each loaded adapter gets its own engine and
scheduler (same engine kind, batch size, prefill chunk and queue as the base); the session
routes a Request whose ``adapter`` names it there (fmaas ``adapter_id``). Merged weights are
a full copy of the model: on CPU each adapter costs what the base costs (its weights plus its
own KV cache), e.g. ~7-11 GB resident per adapter for a 1B fp32 artifact, ~1 GB for an int4
one. Adapters must share the base's tokenizer (same files) and context window and vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidField

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[\w\-/.]+$")  # vllm-tgis-adapter's adapter ids: alphanumerics, _ - / (and .)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_adapter_option(value: str, option: str = "--adapter") -> tuple[str, str]:
    """NAME=ARTIFACT -> (name, artifact path); InvalidField naming the option."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise InvalidField(option, f"expected NAME=ADAPTER_ARTIFACT, got {value!r}")
    if not _NAME.match(name):
        raise InvalidField(option, f"adapter name {name!r} may contain only letters, digits, _ - / and .")
    if not Path(path).is_dir():
        raise InvalidField(option, f"{name}: {path} is not an artifact folder")
    return name, path


def _digest(folder: Path, names=TOKENIZER_FILES) -> dict[str, str | None]:
    return {n: (hashlib.sha256((folder / n).read_bytes()).hexdigest() if (folder / n).is_file() else None)
            for n in names}


@dataclass
class AdapterSet:
    """The loaded adapters: name -> (artifact, engine, scheduler)."""

    artifacts: dict[str, str] = field(default_factory=dict)
    engines: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.schedulers)

    def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    def stop_accepting(self) -> None:
        for s in self.schedulers.values():
            s.stop_accepting()

    def idle(self) -> bool:
        return all(s.idle() for s in self.schedulers.values())

    def shutdown(self, timeout: float | None = None) -> None:
        for s in self.schedulers.values():
            s.shutdown(timeout)
        for e in self.engines.values():
            if hasattr(e, "close"):
                e.close()


def load_adapters(adapters, base_artifact: str, base_engine, make_engine, make_scheduler) -> AdapterSet:
    """Load every (name, artifact) of ``adapters``: ``make_engine(artifact)`` and
    ``make_scheduler(engine)`` build them as the base's were. Refuses (InvalidField naming
    --adapter) an artifact whose tokenizer files, vocabulary or context window differ from the base's."""
    out = AdapterSet()
    base_tokenizer = _digest(Path(base_artifact))
    for name, artifact in adapters:
        if name in out.schedulers:
            raise InvalidField("--adapter", f"adapter name {name!r} is given twice")
        if Path(artifact).resolve() == Path(base_artifact).resolve():
            raise InvalidField("--adapter", f"{name}: {artifact} is the base artifact itself")
        theirs = _digest(Path(artifact))
        if theirs != base_tokenizer:
            differ = [n for n in TOKENIZER_FILES if theirs[n] != base_tokenizer[n]]
            raise InvalidField("--adapter", f"{name}: {artifact} has a different tokenizer than the base artifact "
                                            f"({', '.join(differ)}); an adapter artifact must be exported from the "
                                            "same checkpoint")
        engine = make_engine(artifact)
        b, a = base_engine.info, engine.info
        if (a.vocab_size, a.max_seq_len) != (b.vocab_size, b.max_seq_len):
            engine.close() if hasattr(engine, "close") else None
            raise InvalidField("--adapter", f"{name}: {artifact} has vocabulary {a.vocab_size} and context "
                                            f"{a.max_seq_len}, the base {b.vocab_size} and {b.max_seq_len}")
        out.artifacts[name] = str(artifact)
        out.engines[name] = engine
        out.schedulers[name] = make_scheduler(engine)
        log.info("adapter %s: %s (%s)", name, artifact, a.kind,
                 extra={"fields": {"event": "adapter_loaded", "adapter": name, "artifact": str(artifact)}})
    return out
