"""Cutting one resident peft model at block ``k`` into a client part and a server part.

Nothing is copied: :class:`ModelCut` holds references to the submodules of the ONE peft-wrapped
model the engine keeps (embeddings, blocks, final norm, head, with their LoRA layers), and its
three forward pieces call them in the order the Hugging Face model's own ``forward`` does:

- client part: embeddings + blocks ``[0, k)``            -> hidden state ``[B, T, H]``
- server part: blocks ``[k, n)`` + final norm (+ head and loss unless U-shaped)
- head part (U-shaped only, on the client): head + loss   <- last hidden state ``[B, T, H]``

What crosses the cut besides the hidden state is the 2-D padding mask ``[B, T]``. Each side
rebuilds what its blocks need from it with the transformers helper the model itself uses
(``create_bidirectional_mask`` for BERT/RoBERTa, ``create_causal_mask`` for GPT-2 and LLaMA), so
the extended (4-D, causal) mask is never sent. Positions with right padding are ``arange(T)``:
GPT-2 and BERT add their position embeddings on the client (inside the embeddings), LLaMA's
server recomputes the rotary cos/sin for its blocks from ``arange(T)`` (no parameters, no bytes).

Sequence-classification heads of decoder models (GPT-2, LLaMA) pool the last non-padding token;
Hugging Face finds it from ``input_ids != pad_token_id``, the cut finds it from the mask (the
server never sees token ids). The two agree unless a text contains the pad token itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from ..config import ColoraError
from ..train import task_loss

# model_type -> family; the families differ in embeddings, mask kind, block call and head.
SUPPORTED = {"bert": "bert", "roberta": "bert", "gpt2": "gpt2", "llama": "llama"}


class SplitError(ColoraError):
    """The model cannot be cut as configured (architecture or split layer)."""


def _pool_last(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # [B, T, C] -> [B, C] at the rightmost attended position, as HF's "last non-pad token".
    positions = torch.arange(attention_mask.shape[-1], dtype=torch.int32, device=attention_mask.device)
    last = (positions * attention_mask.to(torch.int32)).argmax(-1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


class _Family(ABC):
    """How one architecture family embeds, masks, runs a block, normalizes and scores."""

    layers: nn.ModuleList

    def __init__(self, hf: nn.Module):
        self.hf = hf
        self.body = getattr(hf, hf.base_model_prefix)
        self.config = hf.config

    @abstractmethod
    def embed(self, batch: dict) -> torch.Tensor:
        """Token (and position / token-type) embeddings, with the model's embedding dropout."""

    @abstractmethod
    def block_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """What every block needs besides the hidden state, rebuilt from the 2-D mask."""

    @abstractmethod
    def block(self, layer: nn.Module, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        """One transformer block, called as the model's own forward calls it."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @abstractmethod
    def head_modules(self) -> list[nn.Module]:
        """The task-head modules (they move to the client in a U-shaped split)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head on the last hidden state: ``[B, C]`` (seq-cls) or ``[B, T, V]`` (causal LM)."""


class _Bert(_Family):
    def __init__(self, hf):
        super().__init__(hf)
        if self.config.is_decoder:
            raise SplitError(f"split: model type {self.config.model_type!r} configured as a decoder is not supported")
        self.layers = self.body.encoder.layer

    def embed(self, batch):
        return self.body.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))

    def block_inputs(self, hidden, attention_mask):
        return {"mask": create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)}

    def block(self, layer, hidden, inputs):
        return layer(hidden, inputs["mask"])

    def head_modules(self):
        if not hasattr(self.hf, "classifier"):
            raise SplitError(f"split: {type(self.hf).__name__} has no supported head (use model.task=seq-cls)")
        mods = [self.hf.classifier]
        if getattr(self.body, "pooler", None) is not None:
            mods.append(self.body.pooler)
        return mods

    def logits(self, hidden, attention_mask):
        if self.config.model_type == "roberta":  # RobertaClassificationHead pools <s> itself
            return self.hf.classifier(hidden)
        pooled = self.body.pooler(hidden)
        return self.hf.classifier(self.hf.dropout(pooled))


class _GPT2(_Family):
    def __init__(self, hf):
        super().__init__(hf)
        self.layers = self.body.h

    def embed(self, batch):
        ids = batch["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        hidden = self.body.wte(ids) + self.body.wpe(positions)
        if batch.get("token_type_ids") is not None:  # GPT-2 embeds token types with wte
            hidden = hidden + self.body.wte(batch["token_type_ids"])
        return self.body.drop(hidden)

    def block_inputs(self, hidden, attention_mask):
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        return {"mask": mask, "position_ids": positions}

    def block(self, layer, hidden, inputs):
        return layer(hidden, None, inputs["mask"], None, encoder_attention_mask=None, use_cache=False,
                     position_ids=inputs["position_ids"])

    def final_norm(self, hidden):
        return self.body.ln_f(hidden)

    def head_modules(self):
        return [self.hf.lm_head] if hasattr(self.hf, "lm_head") else [self.hf.score]

    def logits(self, hidden, attention_mask):
        if hasattr(self.hf, "lm_head"):
            return self.hf.lm_head(hidden)
        return _pool_last(self.hf.score(hidden), attention_mask)


class _Llama(_GPT2):
    def __init__(self, hf):
        _Family.__init__(self, hf)
        self.layers = self.body.layers

    def embed(self, batch):
        return self.body.embed_tokens(batch["input_ids"])  # positions enter as rotary inside each block

    def block_inputs(self, hidden, attention_mask):
        inputs = super().block_inputs(hidden, attention_mask)
        inputs["rotary"] = self.body.rotary_emb(hidden, position_ids=inputs["position_ids"])
        return inputs

    def block(self, layer, hidden, inputs):
        return layer(hidden, attention_mask=inputs["mask"], position_embeddings=inputs["rotary"],
                     position_ids=inputs["position_ids"], cache=None, use_cache=False)

    def final_norm(self, hidden):
        return self.body.norm(hidden)


_FAMILIES = {"bert": _Bert, "gpt2": _GPT2, "llama": _Llama}


class ModelCut:
    """The client/server/head pieces of one resident peft model cut before block ``layer``.

    ``client_modules`` / ``server_modules`` name which submodules (and so which adapter keys and
    base parameters) each party holds; with ``u_shaped`` the task head moves to the client.
    """

    def __init__(self, peft_model: nn.Module, layer: int, u_shaped: bool = False):
        hf = peft_model.get_base_model()
        model_type = hf.config.model_type
        if model_type not in SUPPORTED:
            raise SplitError(
                f"split: model type {model_type!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})"
            )
        self.family = _FAMILIES[SUPPORTED[model_type]](hf)
        self.model_type = model_type
        n = len(self.family.layers)
        if not 1 <= layer <= n - 1:
            raise SplitError(f"split.layer={layer} is outside [1, {n - 1}] for a {n}-block {model_type} model")
        self.layer, self.n_layers, self.u_shaped = layer, n, u_shaped
        self.causal_lm = hasattr(hf, "lm_head")
        self.hf = hf
        fam = self.family
        embeddings = fam.body.embeddings if SUPPORTED[model_type] == "bert" else (
            fam.body.wte if model_type == "gpt2" else fam.body.embed_tokens)
        self.client_modules: list[nn.Module] = [embeddings, *fam.layers[:layer]]
        if model_type == "gpt2":
            self.client_modules.append(fam.body.wpe)
        head = fam.head_modules()
        self.server_modules: list[nn.Module] = list(fam.layers[layer:])
        (self.client_modules if u_shaped else self.server_modules).extend(head)

    def client_forward(self, batch: dict) -> torch.Tensor:
        """Embeddings + blocks ``[0, k)``: the activation ``[B, T, H]`` that goes up."""
        hidden = self.family.embed(batch)
        inputs = self.family.block_inputs(hidden, batch["attention_mask"])
        for layer in self.family.layers[: self.layer]:
            hidden = self.family.block(layer, hidden, inputs)
        return hidden

    def server_body(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Blocks ``[k, n)`` + final norm: the last hidden state ``[B, T, H]``."""
        inputs = self.family.block_inputs(hidden, attention_mask)
        for layer in self.family.layers[self.layer :]:
            hidden = self.family.block(layer, hidden, inputs)
        return self.family.final_norm(hidden)

    def head_loss(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Task head on the last hidden state, then the loss Hugging Face's model would compute."""
        return self.loss(self.family.logits(hidden, attention_mask), labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss Hugging Face's model computes from the head's logits."""
        return task_loss(self.hf.config, logits, labels)

    def server_forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Everything after the cut, loss included (the non-U-shaped server)."""
        return self.head_loss(self.server_body(hidden, attention_mask), attention_mask, labels)
