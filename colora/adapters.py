"""LoRA adapters through peft, and the adapter state dict: the unit that moves between parties.

An *adapter state* is a ``dict[str, Tensor]`` keyed by peft's saved names (adapter name stripped,
e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` and
``base_model.model.classifier.weight`` for the task head). Everything that aggregates, sends or
checkpoints adapters works on these dicts, matched by key, never by position.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file

from .config import ColoraError, ModelConfig
from .models import head_module_names
from .states import lora_pairs, lora_rank
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
        modules_to_save=(head_module_names(model) if cfg.task == "seq-cls" else []) + lora.modules_to_save or None,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (in x out)
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # peft reads a property transformers deprecates: nothing a user can act on
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            peft_model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ColoraError(f"model.lora.target_modules={lora.target_modules}: {str(exc).splitlines()[0]}") from None
    saved = [f".{path}" for path, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name in lora.modules_to_save:
        if not any(path.endswith(f".{name}") for path in saved):  # peft ignores a name that matches nothing
            raise ColoraError(f"model.lora.modules_to_save: {type(model).__name__} has no module named {name!r}; "
                              f"name a module of the model (e.g. pooler) or drop it")
    return peft_model


def _state_key(param_name: str, adapter: str = "default") -> str:
    # peft's live names carry the adapter name ("default") and, for the head, the
    # modules_to_save wrapper; its saved names carry neither.
    return param_name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


class AdapterSlots:
    """The live trainable tensors of one adapter of a resident peft model, addressable by state key.

    Swapping a client in is a ``copy_`` per tensor (O(adapter) bytes, no model copy); the
    ``Parameter`` objects themselves never change, so an optimizer built over them stays valid.
    """

    def __init__(self, model: PeftModel, adapter: str = "default"):
        self.model, self.adapter = model, adapter
        # By name, not by requires_grad: peft marks only the active adapter trainable.
        self.params: dict[str, torch.nn.Parameter] = {
            _state_key(n, adapter): p for n, p in model.named_parameters() if f".{adapter}." in n
        }
        expected = set(get_peft_model_state_dict(model, adapter_name=adapter).keys())
        if set(self.params) != expected:
            raise ColoraError(
                f"trainable parameters do not match the peft adapter: {sorted(set(self.params) ^ expected)[:3]}"
            )

    def get(self) -> AdapterState:
        """A detached copy of the current adapter state, on the CPU (where states travel and combine,
        whatever device the model computes on)."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}

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


def export_adapter(model: PeftModel, slots: AdapterSlots, state: AdapterState, out_dir: Path) -> None:
    """Save ``state`` as a peft adapter folder (``PeftModel.from_pretrained`` loads it)."""
    slots.load(state)
    model.save_pretrained(str(out_dir), selected_adapters=[slots.adapter])


def save_adapter(model: PeftModel, state: AdapterState, out_dir: Path) -> None:
    """Write ``state`` as a peft adapter folder at its own rank (the run's config with r = that rank).

    The same files ``save_pretrained`` writes (adapter_config.json, adapter_model.safetensors), for a
    rank that need not be attached to ``model``; ``PeftModel.from_pretrained`` loads it.
    """
    cfg = copy.deepcopy(model.peft_config["default"])
    cfg.r, cfg.inference_mode = lora_rank(state), True
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out_dir))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out_dir / SAFETENSORS_WEIGHTS_NAME),
              metadata={"format": "pt"})


class RankedAdapters:
    """One resident base model carrying one LoRA adapter per rank in use; the base weights are shared.

    The run's own adapter (``model.lora.r``, peft name "default", attached by :func:`attach_lora`)
    serves that rank; any other rank gets a peft adapter "rank<r>" on first use, initialized from the
    run's seed like :func:`attach_lora` would. Extra memory: one adapter (and one copy of the task
    head, which peft keeps per adapter) per distinct rank.

    For FLoRA-style merging, :meth:`merge_base` sets the LoRA layers' frozen base weights to
    W0 + ΔW of a given adapter state (W0 kept once per merged layer, d_out x d_in each); ``None``
    restores W0. Each call with a new state costs one d_out x R x d_in product per module.
    """

    def __init__(self, model: PeftModel, seed: int):
        self.model, self.seed = model, seed
        self.alpha = float(model.peft_config["default"].lora_alpha)
        default = AdapterSlots(model)
        self.default_rank = lora_rank(default.get())
        self.slots: dict[int, AdapterSlots] = {self.default_rank: default}
        self.initial: dict[int, AdapterState] = {self.default_rank: default.get()}
        self._active = "default"
        self._w0: dict[str, torch.nn.Parameter] = {}  # merged layer prefix -> its original base weight
        self._merged: AdapterState | None = None

    def ensure(self, rank: int) -> AdapterSlots:
        """The slots of the rank-``rank`` adapter, attaching it on first use."""
        if rank not in self.slots:
            cfg = copy.deepcopy(self.model.peft_config["default"])
            cfg.r = rank
            torch.manual_seed(self.seed)
            self.model.add_adapter(f"rank{rank}", cfg)
            self.slots[rank] = AdapterSlots(self.model, f"rank{rank}")
            self.initial[rank] = self.slots[rank].get()
        return self.slots[rank]

    def live(self, keys: list[str], rank: int | None = None) -> dict[str, torch.nn.Parameter]:
        """The live tensors of ``keys``: LoRA factors from the rank-``rank`` adapter (None: the
        default), anything else (the task head) always from the default adapter."""
        default = self.slots[self.default_rank].params
        own = default if rank is None else self.ensure(rank).params
        return {k: (own if ".lora_" in k else default)[k] for k in keys}

    def initial_state(self, rank: int) -> AdapterState:
        """The seeded initial adapter at ``rank`` (A from the seed, B = 0, the fresh head)."""
        self.ensure(rank)
        return self.initial[rank]

    def activate(self, rank: int | None) -> AdapterSlots:
        """Make the rank-``rank`` adapter (None: the default one) the one the model runs and trains."""
        slots = self.ensure(self.default_rank if rank is None else rank)
        if slots.adapter != self._active:
            self.model.set_adapter(slots.adapter)
            self._active = slots.adapter
        return slots

    def merge_base(self, delta: AdapterState | None) -> None:
        """Base weights := W0 + (alpha/R) B A for every LoRA pair of ``delta`` (rank R); None: W0.

        The merged weight is a new tensor swapped in for W0 (kept by reference, never written): the
        frozen base may be a read-only map shared with other processes (colora.engines.shared_base)."""
        if delta is self._merged:
            return
        for prefix, w0 in self._w0.items():
            self._set_base_weight(prefix, w0)
        if delta is not None:
            scale = self.alpha / lora_rank(delta)
            with torch.no_grad():
                for prefix, (a_key, b_key) in lora_pairs(delta).items():
                    w0 = self._w0.setdefault(prefix, self._base_weight(prefix))
                    dw = scale * (delta[b_key].double() @ delta[a_key].double())
                    dw = dw.T if self.model.get_submodule(prefix).fan_in_fan_out else dw
                    self._set_base_weight(prefix, torch.nn.Parameter(w0 + dw.to(w0.device, w0.dtype), requires_grad=False))
        self._merged = delta

    def _set_base_weight(self, prefix: str, weight: torch.nn.Parameter) -> None:
        self.model.get_submodule(prefix).get_base_layer().weight = weight

    def _base_weight(self, prefix: str) -> torch.Tensor:
        return self.model.get_submodule(prefix).get_base_layer().weight

    def load_for_eval(self, state: AdapterState) -> None:
        """Put ``state`` into the model for evaluation, whatever its rank.

        A rank with an attached adapter loads into it. Any other rank (e.g. ``stack``'s growing
        global) is merged into the base weights instead and runs with the default adapter's LoRA at
        zero and the state's head: the same function, at no extra adapter memory.
        """
        rank = lora_rank(state)
        if rank in self.slots:
            self.merge_base(None)
            self.activate(rank).load(state)
            return
        lora = {k for pair in lora_pairs(state).values() for k in pair}
        self.merge_base({k: state[k] for k in lora})
        slots = self.activate(None)
        zeros = {k: torch.zeros_like(p) for k, p in slots.params.items() if k in lora}  # same names, other rank
        slots.load({**zeros, **{k: v for k, v in state.items() if k not in lora}})

    def export(self, state: AdapterState, out_dir: Path) -> None:
        """Save ``state`` as a peft adapter folder at its own rank."""
        if lora_rank(state) == self.default_rank:
            self.merge_base(None)
            export_adapter(self.model, self.slots[self.default_rank], state, out_dir)
        else:
            save_adapter(self.model, state, out_dir)
