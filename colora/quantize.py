"""Quantized frozen base weights (``model.quantize: none | int8 | 4bit``), QLoRA-style.

The frozen base's linear layers are replaced by bitsandbytes layers before LoRA is attached, for
every paradigm; peft then wraps them with its own bitsandbytes LoRA layers (``Linear8bitLt`` /
``Linear4bit`` in ``peft.tuners.lora.bnb``), the QLoRA path that is also the usual one on GPUs:

- ``int8``: LLM.int8() weights (``bnb.nn.Linear8bitLt``): one int8 per weight plus one fp32 scale
  per output row, about 1/4 of the fp32 bytes.
- ``4bit``: NF4 with double quantization (``bnb.nn.Linear4bit``): two 4-bit codes per byte plus
  per-64-entry block scales (themselves 8-bit with fp32 second-level scales), about 1/8.

Measured on minilm-l6 (all tensors of the base, ``resident_nbytes``): fp32 90.9 MB, int8 58.7 MB,
4bit 53.4 MB. The embeddings (47.7 MB) stay fp32, as in QLoRA, so the whole base shrinks less
than its 37 linear layers, whose weights (with their scales) go 43.1 MB -> 10.8 MB -> 5.6 MB.

Why bitsandbytes: peft's LoRA layers support it natively for 8- and 4-bit bases, and its CPU
backend (bitsandbytes 0.50, tested here with peft 0.21 and torch 2.13) trains them, so the same
code serves CPU and GPU runs. Alternatives tried on this CPU: torchao int8 weights train with
peft's ``TorchaoLoraLinear``, but peft refuses torchao's int4 tensors and torchao's CPU int4
layout (``IntxWeightOnlyConfig``) keeps one code per byte (no saving over int8: 58.7 MB both);
optimum-quanto trains, but peft has no quanto LoRA layer (it wraps ``QLinear`` as a plain Linear)
and quanto's last release is from March 2025.

What stays in full precision (as in QLoRA): embeddings, layer norms, biases, the task head (it
trains) and a causal LM's output projection (often tied to the embeddings). GPT-2's ``Conv1D``
projections (in x out) become linear layers first. A quantized base gives different numbers
from the fp32 base, deterministic at a fixed seed.
"""

from __future__ import annotations

import importlib.util

import torch

from .config import ColoraError

MODES = ("none", "int8", "4bit")
_KEEP_ALWAYS = ("lm_head",)


def _bnb():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ColoraError(
            "model.quantize needs bitsandbytes, which is not installed: pip install 'colora[quant]' "
            "(or set model.quantize=none)"
        )
    import bitsandbytes as bnb

    return bnb


def _linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """(out x in) weight of a Linear or GPT-2 Conv1D, else None."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.data
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.data.t().contiguous()
    return None


def quantize_base(model: torch.nn.Module, mode: str, keep: list[str] | tuple[str, ...] = ()) -> torch.nn.Module:
    """Replace the frozen linear layers of ``model`` by int8 or NF4 bitsandbytes layers, in place.

    ``keep`` names modules left in full precision with everything inside them (the task head, modules
    trained in full), as whole path components: ``pooler`` and ``bert.pooler`` both keep ``bert.pooler``. ``mode == "none"`` returns the
    model untouched. Call before attaching LoRA.
    """
    if mode == "none":
        return model
    if mode not in MODES:
        raise ColoraError(f"model.quantize={mode!r}: unknown mode (valid: {', '.join(MODES)})")
    bnb = _bnb()
    skip = set(keep) | set(_KEEP_ALWAYS)
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and not any(f".{k}." in f".{name}." for k in skip)
               and _linear_weight(mod) is not None]
    for name, mod in targets:
        weight = _linear_weight(mod)
        out_f, in_f = weight.shape
        has_bias = getattr(mod, "bias", None) is not None
        if mode == "int8":
            # LLM.int8()'s outlier threshold (6.0, transformers' default) only matters where
            # activations are int8 too (CUDA); the CPU backend multiplies by the dequantized weights.
            q = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
            # bitsandbytes' AVX512-BF16 inference path repacks the weight (bf16 scales) on the first
            # no-grad forward; training after that fails (measured: "a view of a leaf Variable ...
            # in-place" on minilm-l6) and it needs in_features >= 64. colora evaluates before it
            # trains, so keep the one reference kernel for both (same numbers in eval and training).
            q.support_avx512bf16_for_cpu = False
        if has_bias:
            q.bias = torch.nn.Parameter(mod.bias.data.clone(), requires_grad=False)
        q = q.to(weight.device)  # bitsandbytes quantizes on the move to a device
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
    # peft picks its bitsandbytes LoRA layers from these flags (transformers sets them when it
    # loads a quantized checkpoint).
    model.is_loaded_in_8bit = mode == "int8"
    model.is_loaded_in_4bit = mode == "4bit"
    return model


def _tensor_nbytes(t: torch.Tensor | None, seen: set[int]) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    key = t.untyped_storage().data_ptr() if t.numel() else id(t)
    if key in seen:
        return 0
    seen.add(key)
    total = t.numel() * t.element_size()
    # 4-bit: the per-block scales and codebook ride on the weight's quant_state (nested: the
    # scales' own 8-bit scales), not as parameters or buffers.
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        total += _tensor_nbytes(qs.absmax, seen) + _tensor_nbytes(qs.code, seen)
        if getattr(qs, "state2", None) is not None:
            total += _tensor_nbytes(qs.state2.absmax, seen) + _tensor_nbytes(qs.state2.code, seen)
    return total + _tensor_nbytes(getattr(t, "SCB", None), seen)


def resident_nbytes(model: torch.nn.Module) -> int:
    """Bytes the model's tensors hold: parameters, buffers and the quantization statistics
    bitsandbytes keeps beside them (int8 row scales, 4-bit block scales and codebooks); a tensor
    shared by several modules (tied embeddings, a common codebook) counts once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += _tensor_nbytes(t, seen)
        # int8: the per-row scales move from the weight to the layer's state on first use.
        total += _tensor_nbytes(getattr(getattr(module, "state", None), "SCB", None), seen)
    return total
