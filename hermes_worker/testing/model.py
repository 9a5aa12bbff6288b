"""Build a tiny Hermes-4-shaped Llama checkpoint, offline, in seconds.

The checkpoint is real enough for vLLM to serve (LlamaForCausalLM, head_dim 64, safetensors,
a byte-level BPE tokenizer with the Llama-3 / Hermes special tokens) and small enough for CI.
Its weights are random, so its text is noise; tests that need exact output force the format
with structured outputs. Shipped in the package so users can test their own producers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

from hermes_worker.inference.templates import fallback_template

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
END_OF_TEXT = "<|end_of_text|>"
# Llama-3 control tokens: special, so skip_special_tokens would drop them.
CONTROL_TOKENS = (BOS, END_OF_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOT)
# Hermes tags: added as whole tokens but not "special", as in the real tokenizer, so they
# survive detokenization and reach the output parser.
TAG_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
HERMES_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
# The checkpoint's own template: the packaged fallback, a test template that behaves as the
# official Hermes 4 one is documented to (hermes4_official_like.jinja), or none.
ChatTemplateChoice = Literal["fallback", "official-like", "none"]
CHAT_TEMPLATES: tuple[str, ...] = get_args(ChatTemplateChoice)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the test checkpoint. head_dim must stay >= 64 for vLLM's CPU attention."""

    vocab_size: int = 1024
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    seed: int = 0
    chat_template: ChatTemplateChoice = "fallback"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def official_like_template() -> str:
    """The test template that behaves as the official Hermes 4 one is documented to."""
    return (resources.files("hermes_worker.testing") / "hermes4_official_like.jinja").read_text(
        "utf-8"
    )


def _own_template(spec: TinyModelSpec) -> str | None:
    if spec.chat_template == "none":
        return None
    if spec.chat_template == "official-like":
        return official_like_template()
    return fallback_template()


def _training_text(spec: TinyModelSpec) -> str:
    corpus = (resources.files("hermes_worker") / "testing" / "corpus.txt").read_text("utf-8")
    # The templates' fixed prose is in the corpus too, so prompts tokenize into few tokens.
    extra = [official_like_template()] if spec.chat_template == "official-like" else []
    return "\n".join([corpus, fallback_template(), *extra])


def build_tokenizer(spec: TinyModelSpec):  # type: ignore[no-untyped-def]  # transformers is untyped
    """A byte-level BPE tokenizer (any text encodes) with the Hermes 4 added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=spec.vocab_size - len(CONTROL_TOKENS) - len(TAG_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_training_text(spec).splitlines(keepends=True), trainer)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    bos_id = core.token_to_id(BOS)
    # Like Llama-3's tokenizer: plain encode() prepends BOS. Rendering must therefore
    # encode with add_special_tokens=False, and the tests check it does.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=END_OF_TEXT,
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.chat_template = _own_template(spec)
    return tokenizer


def build_test_model(directory: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a servable tiny checkpoint into ``directory`` and return its path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    if spec.head_dim < 64:
        raise ValueError(f"head_dim {spec.head_dim} < 64: vLLM's CPU attention rejects it")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(str(out))
    eos_ids = [tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(END_OF_TEXT)]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, do_sample=True, **HERMES_SAMPLING
    ).save_pretrained(str(out))
    (out / "hermes_test_model.json").write_text(
        json.dumps({"builder": "hermes-worker make-test-model", **spec.__dict__}, indent=2) + "\n"
    )
    return out
