"""LoRA adapters through peft, and the adapter state dict: the unit that moves between parties.

An *adapter state* is a ``dict[str, Tensor]`` keyed by peft's saved names (adapter name stripped,
e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` and
``base_model.model.classifier.weight`` for the task head). Everything that aggregates, sends or
checkpoints adapters works on these dicts, matched by key, never by position.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save as safetensors_save

from .config import ColoraError, ModelConfig
from .models import head_module_names
from .types import AdapterState


def attach_lora(model: torch.nn.Module, cfg: ModelConfig, seed: int, rank: int | None = None) -> PeftModel:
    """Wrap ``model`` with LoRA; the frozen base stays shared, only adapter + head train.

    LoRA A is initialized from ``seed`` (B = 0, so the initial update is exactly zero).
    """
    lora = cfg.lora
    task_type = TaskType.SEQ_CLS if cfg.task == "seq-cls" else TaskType.CAUSAL_LM
    peft_cfg = PeftLoraConfig(
        r=rank or lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        modules_to_save=head_module_names(model) if cfg.task == "seq-cls" else None,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (in x out)
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ColoraError(f"model.lora.target_modules={lora.target_modules}: {str(exc).splitlines()[0]}") from None


def _state_key(param_name: str) -> str:
    # peft's live names carry the adapter name ("default") and, for the head, the
    # modules_to_save wrapper; its saved names carry neither.
    return param_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


class AdapterSlots:
    """The live trainable tensors of one resident peft model, addressable by state key.

    Swapping a client in is a ``copy_`` per tensor (O(adapter) bytes, no model copy); the
    ``Parameter`` objects themselves never change, so an optimizer built over them stays valid.
    """

    def __init__(self, model: PeftModel):
        self.model = model
        self.params: dict[str, torch.nn.Parameter] = {
            _state_key(n): p for n, p in model.named_parameters() if p.requires_grad
        }
        expected = set(get_peft_model_state_dict(model).keys())
        if set(self.params) != expected:
            raise ColoraError(
                f"trainable parameters do not match the peft adapter: {sorted(set(self.params) ^ expected)[:3]}"
            )

    def get(self) -> AdapterState:
        """A detached copy of the current adapter state."""
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load(self, state: AdapterState) -> None:
        """Copy ``state`` into the live tensors; missing or unexpected keys are errors."""
        missing = self.params.keys() - state.keys()
        unexpected = state.keys() - self.params.keys()
        if missing or unexpected:
            raise ColoraError(
                f"adapter state does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def serialize(state: AdapterState) -> bytes:
    """The bytes that go on the wire for ``state`` (safetensors, the format peft saves)."""
    return safetensors_save({k: v.contiguous() for k, v in state.items()})


def payload_nbytes(state: AdapterState) -> int:
    """Size of the real serialized payload of ``state``, in bytes."""
    return len(serialize(state))


def lora_pairs(state: AdapterState) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its (A key, B key) in ``state``."""
    pairs = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            pairs[prefix] = (key, prefix + ".lora_B.weight")
    return pairs


def export_adapter(model: PeftModel, slots: AdapterSlots, state: AdapterState, out_dir: Path) -> None:
    """Save ``state`` as a peft adapter folder (``PeftModel.from_pretrained`` loads it)."""
    slots.load(state)
    model.save_pretrained(str(out_dir))
