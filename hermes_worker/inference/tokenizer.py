"""A checkpoint's tokenizer for rendering prompts, loaded as cheaply as it can be.

Rendering needs little of a tokenizer: encoding (with and without special tokens split as
text), the added tokens and whether each is special, BOS/EOS and the chat template. A
checkpoint whose tokenizer is ``tokenizer.json`` alone (Llama 3 and Hermes 4 name the class
``PreTrainedTokenizerFast``; transformers 5 writes ``TokenizersBackend``) gets exactly that
from the ``tokenizers`` library (:class:`PlainTokenizer`: ~0.03 s of CPU to load, against
~2 s for importing transformers' fast tokenizer, paid by every worker start and ``render``).
Anything else it might not reproduce (other tokenizer classes, settings in
``tokenizer_config.json`` beyond the ones listed in ``_PLAIN_CONFIG_KEYS``, added tokens
that ``tokenizer.json`` lacks) loads through transformers as before.
``tests/test_template.py`` holds the two to the same ids, tokens and template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# tokenizer_config.json settings that change nothing the renderer asks of a tokenizer, or
# that PlainTokenizer reads itself; any other key sends the checkpoint to transformers.
_PLAIN_CONFIG_KEYS = frozenset(
    {
        "added_tokens_decoder",  # checked against tokenizer.json's added tokens
        "backend",
        "bos_token",
        "chat_template",
        "clean_up_tokenization_spaces",  # decoding only; transformers ignores it for BPE
        "eos_token",
        "extra_special_tokens",  # only when empty
        "model_input_names",
        "model_max_length",
        "pad_token",
        "padding_side",
        "tokenizer_class",
        "truncation_side",
        "unk_token",
    }
)


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool


class PlainTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, with the attributes the
    renderer reads of a Hugging Face tokenizer. Not safe to share across threads (the
    renderer encodes under a lock of its own)."""

    def __init__(self, model: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tokenizer = RustTokenizer.from_file(str(model / "tokenizer.json"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = _chat_template(model, config)
        self.added_tokens_decoder = {
            index: AddedToken(token.content, bool(token.special))
            for index, token in self._tokenizer.get_added_tokens_decoder().items()
        }
        self.is_bpe = type(self._tokenizer.model).__name__ == "BPE"

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        self._tokenizer.encode_special_tokens = split_special_tokens
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


def load_tokenizer(model: Path) -> Any:
    """The checkpoint's tokenizer: :class:`PlainTokenizer` where it reproduces transformers',
    else transformers' own (``AutoTokenizer``: its import brings torch, 5-6 s)."""
    plain = plain_tokenizer(model)
    if plain is not None:
        return plain
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model), local_files_only=True)


def plain_tokenizer(model: Path) -> PlainTokenizer | None:
    """:class:`PlainTokenizer` for ``model``, or None where it might differ from transformers."""
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    if not (model / "tokenizer.json").is_file() or not isinstance(config, dict):
        return None
    if config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES:
        return None
    if set(config) - _PLAIN_CONFIG_KEYS or config.get("extra_special_tokens"):
        return None
    tokenizer = PlainTokenizer(model, config)
    if config.get("clean_up_tokenization_spaces") and not tokenizer.is_bpe:
        return None  # transformers' decode would change spaces before punctuation
    declared = config.get("added_tokens_decoder") or {}
    for index, token in declared.items():
        have = tokenizer.added_tokens_decoder.get(int(index))
        if have is None or (have.content, have.special) != (
            token.get("content"),
            bool(token.get("special")),
        ):
            return None
    return tokenizer


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken's dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model: Path, config: dict[str, Any]) -> Any:
    """The chat template(s) as transformers reads them: ``chat_template.jinja`` before the
    config's, named templates from ``additional_chat_templates/`` (a dict with "default"),
    a config's list of ``{name, template}`` as a dict."""
    own = model / "chat_template.jinja"
    template: Any = own.read_text("utf-8") if own.is_file() else config.get("chat_template")
    if isinstance(template, list):
        template = {item["name"]: item["template"] for item in template}
    extra = model / "additional_chat_templates"
    if extra.is_dir():
        named = {path.stem: path.read_text("utf-8") for path in sorted(extra.glob("*.jinja"))}
        if named:
            template = {**named, **({"default": template} if isinstance(template, str) else {})}
    return template
