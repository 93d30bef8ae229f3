"""Fused multi-adapter training: K clients' local steps in ONE batched forward/backward over the
shared base (``engine.fuse``), with exactly the sequential semantics.

Each step concatenates the active clients' batches along the batch dimension (client-major rows,
each batch right-padded to one common width ``L``) and runs the resident model once:

- the frozen base projections run once over all K·b rows (the GEMMs that dominate a step);
- each LoRA layer adds every client's own low-rank delta to its own rows: the factors are stacked
  per step (``A[K, r_max, d_in]``, ``B[K, d_out, r_max]``, mixed ranks zero-padded to ``r_max``,
  which adds exact zeros) and applied with two ``bmm`` s;
- the task head (peft's ``modules_to_save``) and the attention core run per client on its own rows
  at its own width (attention has no weights to share, and its dropout must see the client's shape);
- every dropout draws its mask per client, at the client's own width, from the client's own
  generator stream, seeded exactly as the sequential loop seeds it: fused and sequential runs draw
  the same masks.

Each client's loss is the mean over its own samples; the backward of their sum gives each client
exactly its own gradient (its adapter touches only its rows, and no base operation mixes rows).
Gradient clipping, FedProx and the optimizer stay per client (one optimizer each, as sequentially).
Results agree with the sequential loop up to floating-point order (tests: 1e-5 in eval loss).

Memory: a fused step holds K clients' activations at once (colora.system caps ``engine.fuse``).
Padding to the common width costs K·b·(L - L_k) extra token rows in the base GEMMs; the attention
core runs at each client's own width.

Which dimensions are "sequence" dimensions (to be cut to a client's own width) is found by size:
``L`` is chosen to differ from every parameter dimension and integer setting of the model, so a
dimension of size ``L`` can only be a sequence position.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .config import ColoraError


def rng_snapshot(device: torch.device) -> tuple:
    """The global generators' state (CPU, and the device's when it is a GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def rng_restore(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class FusedStep:
    """What the patched layers need to know about the step in flight."""

    params: list[dict[str, torch.Tensor]]  # per active client: its live adapter tensors by state key
    widths: list[int]  # per active client: its own padded batch width
    rows: int  # batch rows per client (train.batch_size)
    width: int  # the common width L every batch is padded to
    streams: list[tuple]  # per active client: its dropout generator state
    scaling: list[dict[str, float]]  # per active client: LoRA scaling by layer prefix (alpha / rank)
    device: torch.device
    current: int | None = None  # the client whose rows alone are in flight (head, attention core)
    _narrow_cache: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def client(self, j: int) -> Iterator[None]:
        """Run with client ``j``'s rows alone, drawing from its generator stream."""
        before, self.current = self.current, j
        rng_restore(self.streams[j], self.device)
        try:
            yield
        finally:
            self.streams[j] = rng_snapshot(self.device)
            self.current = before

    def own(self, t: torch.Tensor, j: int) -> tuple:
        """The index of client ``j``'s own region in ``t`` (its rows, when ``t`` holds all clients',
        and its own width on every dimension of size ``L``)."""
        rows = slice(None) if self.current is not None else slice(j * self.rows, (j + 1) * self.rows)
        return (rows, *(slice(0, self.widths[j]) if n == self.width else slice(None) for n in t.shape[1:]))

    def segments(self) -> range:
        return range(len(self.params)) if self.current is None else range(self.current, self.current + 1)


_STEP: FusedStep | None = None  # the fused step in flight (None: every patched layer runs as peft wrote it)


def _dropout_forward(module: torch.nn.Dropout):
    def forward(x: torch.Tensor) -> torch.Tensor:
        step = _STEP
        if step is None or not module.training or module.p == 0:
            return F.dropout(x, module.p, module.training, module.inplace)
        out = x.clone()
        for j in step.segments():
            idx = step.own(x, j)
            with step.client(j) if step.current is None else contextlib.nullcontext():
                out[idx] = F.dropout(x[idx], module.p, True)
        return out
    return forward


def _lora_forward(layer: LoraLinear, prefix: str, original):
    dropout = layer.lora_dropout["default"]

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        step = _STEP
        if step is None:
            return original(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)  # the frozen GEMM, once for all K clients' rows
        clients = list(step.segments())
        a = [step.params[j][f"{prefix}.lora_A.weight"] for j in clients]  # r_k x d_in
        b = [step.params[j][f"{prefix}.lora_B.weight"] for j in clients]  # d_out x r_k
        r_max = max(t.shape[0] for t in a)
        a = torch.stack([F.pad(t, (0, 0, 0, r_max - t.shape[0])) for t in a])  # K x r_max x d_in
        b = torch.stack([F.pad(t, (0, r_max - t.shape[1])) for t in b])  # K x d_out x r_max
        scale = torch.tensor([step.scaling[j][prefix] for j in clients], device=x.device).view(-1, 1, 1)
        xd = dropout(x).reshape(len(clients), -1, x.shape[-1])  # K x (b·L) x d_in
        delta = torch.bmm(torch.bmm(xd.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)) * scale  # K x (b·L) x d_out
        return result + delta.reshape(result.shape).to(result.dtype)
    return forward


def _head_forward(wrapper: ModulesToSaveWrapper, prefix: str, original):
    module = wrapper.modules_to_save["default"]
    names = [n for n, _ in module.named_parameters()]

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        step = _STEP
        if step is None:
            return original(x, *args, **kwargs)
        outs = []
        for j in step.segments():
            rows = step.own(x, j)[0]
            params = {n: step.params[j][f"{prefix}.{n}"] for n in names}
            with step.client(j) if step.current is None else contextlib.nullcontext():
                outs.append(torch.func.functional_call(module, params, (x[rows], *args), kwargs))
        return torch.cat(outs)
    return forward


def _attention(original_for):
    def attention(module, query, key, value, attention_mask, **kwargs):
        step, original = _STEP, original_for(module)
        if step is None or step.current is not None:
            return original(module, query, key, value, attention_mask, **kwargs)
        outs = []
        for j in step.segments():  # B x heads x L x d -> the client's rows at its own width
            q, k, v = (t[step.own(t, j)] for t in (query, key, value))
            mask = attention_mask
            if mask is not None:  # B x 1 x L x L, or 1 x ... when one mask serves every row
                mask = mask[step.own(mask, j)] if mask.shape[0] > 1 else mask[(slice(None), *step.own(mask, j)[1:])]
            with step.client(j):
                out, _ = original(module, q, k, v, mask, **kwargs)  # b x L_k x heads x d
            outs.append(torch.cat([out, out.new_zeros(out.shape[0], step.width - out.shape[1], *out.shape[2:])], 1))
        return torch.cat(outs), None
    return attention


def common_width(model, widths: list[int]) -> int:
    """The width every batch of a fused step is padded to: at least the longest, and different from
    every parameter dimension and integer setting of ``model`` (see the module docstring)."""
    sizes = getattr(model, "_colora_sizes", None)
    if sizes is None:
        sizes = {n for p in model.parameters() for n in p.shape}
        sizes |= {v for v in model.config.to_dict().values() if isinstance(v, int) and not isinstance(v, bool)}
        model._colora_sizes = sizes
    width = max(widths)
    while width in sizes:
        width += 1
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and width > limit:
        raise ColoraError(f"a fused batch of width {width} exceeds the model's {limit} positions; "
                          f"lower data.max_length below {limit} or set engine.fuse=1")
    return width


@contextlib.contextmanager
def fused_layers(model) -> Iterator[None]:
    """Patch ``model`` (a peft model) so that a forward inside :func:`fused_step` runs fused.

    Outside a fused step every patched layer runs its own code unchanged. Patches are per instance
    and removed on exit."""
    patched: list[torch.nn.Module] = []
    impl = model.config._attn_implementation or "eager"

    def original_attention(module):
        if impl in AttentionInterface._global_mapping:
            return AttentionInterface._global_mapping[impl]
        return sys.modules[type(module).__module__].eager_attention_forward

    try:
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                if not isinstance(module, LoraLinear):
                    raise ColoraError(f"engine.fuse supports LoRA on linear layers only; {name} is "
                                      f"{type(module).__name__}: set engine.fuse=1 or change model.lora.target_modules")
                module.forward = _lora_forward(module, name, module.forward)  # name + ".lora_A.weight": its state keys
            elif isinstance(module, ModulesToSaveWrapper):
                module.forward = _head_forward(module, name, module.forward)
            elif isinstance(module, torch.nn.Dropout):
                module.forward = _dropout_forward(module)
            else:
                continue
            patched.append(module)
        had = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
        ALL_ATTENTION_FUNCTIONS[impl] = _attention(original_attention)
        yield
    finally:
        for module in patched:
            del module.forward
        if "had" in locals() and not had:
            del ALL_ATTENTION_FUNCTIONS[impl]


@contextlib.contextmanager
def fused_step(step: FusedStep) -> Iterator[FusedStep]:
    """Make ``step`` the step in flight for the layers patched by :func:`fused_layers`."""
    global _STEP
    _STEP = step
    try:
        yield step
    finally:
        _STEP = None
