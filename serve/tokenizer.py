"""The artifact's tokenizer and chat template, without transformers.

Reads the files a Hugging Face checkpoint (or our exported artifact) carries:
tokenizer.json (the actual tokenizer, via the `tokenizers` library),
tokenizer_config.json (special tokens, add_bos_token, chat template),
special_tokens_map.json (legacy special tokens), chat_template.jinja and
additional_chat_templates/*.jinja (where transformers 5 saves templates), and
generation_config.json / config.json (extra stop ids). Encoding and decoding
give the same ids/text as transformers' fast tokenizer for the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from .chat_template import render_chat_template, select_template

# transformers' named special tokens; only these are passed into the chat template context.
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


class TokenizerFilesError(ValueError):
    """The artifact folder lacks a file the tokenizer needs, or a file is unreadable."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerFilesError(f"cannot read {path}: {e}") from e


def _token_text(value: Any) -> str | None:
    # Special tokens are stored either as strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_set(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int)}
    return set()


class GraniteTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: str | Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        extra_stop_ids: set[int] | None = None,
    ):
        self._tok = tokenizer
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates = chat_templates
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._extra_stop_ids = set(extra_stop_ids or ())

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path, trusted_files=None) -> "GraniteTokenizer":
        """trusted_files: the names the artifact's manifest lists (artifact.open_trusted verified them);
        given, no other file is read, and one present but unlisted is ignored with a warning."""
        path = Path(path)

        def present(name: str) -> bool:
            exists = (path / name).is_file()
            if trusted_files is not None and name not in trusted_files:
                if exists:
                    logging.getLogger(__name__).warning(
                        "%s: ignoring %s: the artifact's manifest does not list it", path, name)
                return False
            return exists

        tokenizer_file = path / "tokenizer.json"
        if not present(tokenizer_file.name):
            raise TokenizerFilesError(f"tokenizer.json not found in {path} (the artifact must ship {tokenizer_file.name})")
        try:
            tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerFilesError(f"cannot load {tokenizer_file}: {e}") from e

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if present(config_file.name) else {}

        # Tokens declared only in tokenizer_config's added_tokens_decoder are added, as transformers does.
        for _, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(entry, dict) and entry.get("content") and tok.token_to_id(entry["content"]) is None:
                fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
                token = AddedToken(entry["content"], special=bool(entry.get("special", False)), **fields)
                (tok.add_special_tokens if entry.get("special") else tok.add_tokens)([token])

        special = {k: _token_text(config.get(k)) for k in _NAMED_SPECIAL}
        map_file = path / "special_tokens_map.json"
        if present(map_file.name):
            # transformers 5 reads this legacy file only when tokenizer_config lacks added_tokens_decoder,
            # and then it wins; otherwise it can only fill gaps.
            legacy = _read_json(map_file)
            override = "added_tokens_decoder" not in config
            for k in _NAMED_SPECIAL:
                value = _token_text(legacy.get(k))
                if value is not None and (override or special.get(k) is None):
                    special[k] = value

        stop_ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            if present(name):
                try:
                    stop_ids |= _as_id_set(_read_json(path / name).get("eos_token_id"))
                except TokenizerFilesError:
                    pass  # config.json may use non-standard JSON (e.g. Infinity); stop ids are optional

        return cls(
            tok,
            special_tokens=special,
            chat_templates=cls._load_templates(path, config, present),
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            extra_stop_ids=stop_ids,
        )

    @staticmethod
    def _load_templates(path: Path, config: dict, present=None) -> str | dict[str, str] | None:
        present = present or (lambda name: (path / name).is_file())
        raw = config.get("chat_template")
        if isinstance(raw, list):  # older format: [{"name": ..., "template": ...}]
            templates = {t["name"]: t["template"] for t in raw}
        elif isinstance(raw, str):
            templates = {"default": raw}
        else:
            templates = {}
        # transformers 5 saves templates as files; they take precedence over the config entry.
        jinja_file = path / "chat_template.jinja"
        if present(jinja_file.name):
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                if present(f"{extra_dir.name}/{f.name}"):
                    templates[f.stem] = f.read_text(encoding="utf-8")
        if not templates:
            return None
        if list(templates) == ["default"]:
            return templates["default"]
        return templates

    # ------------------------------------------------------------------ ids and text

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text become their ids (the tokenizers library matches added
        # tokens first). BOS/EOS only if the artifact asks for them; Granite does not.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def encode_nogil(self, text: str) -> list[int]:
        """`encode`, but releasing the GIL while the tokenizers library works on a long text
        (``encode_batch`` does, ``encode`` does not): a worker thread tokenising a 5 MB prompt
        then does not stall the event loop."""
        if len(text) < 4096:
            return self.encode(text)
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def encode_with_offsets(self, text: str):
        """The `tokenizers` Encoding of `text` without added tokens (ids and offsets), GIL released."""
        return self._tok.encode_batch([text], add_special_tokens=False)[0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # transformers 5 skips clean_up_tokenization_spaces for BPE models, so a plain decode matches it.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def stop_token_ids(self) -> set[int]:
        ids = set(self._extra_stop_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids

    # ------------------------------------------------------------------ prompts

    def render_chat(
        self,
        messages,
        tools=None,
        documents=None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ) -> str:
        """The prompt string for a conversation, as the artifact's own chat template renders it."""
        template = select_template(self.chat_templates, chat_template, tools)
        return render_chat_template(
            template,
            messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        missing = [t for t in FIM_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"this tokenizer has no fill-in-the-middle tokens: missing {', '.join(missing)}")
        return f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
