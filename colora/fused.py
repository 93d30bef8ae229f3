"""Fused multi-adapter training: K clients' local steps in ONE batched forward/backward over the
shared base (``engine.fuse``), with exactly the sequential semantics.

Each step concatenates the active clients' batches along the batch dimension (client-major rows,
each batch right-padded to one common width ``L``) and runs the resident model once:

- the frozen base projections run once over all K·b rows (the GEMMs that dominate a step);
- each LoRA layer adds every client's own low-rank delta to its own rows: the factors are stacked
  per step (``A[K, r_max, d_in]``, ``B[K, d_out, r_max]``, mixed ranks zero-padded to ``r_max``,
  which adds exact zeros) and applied with two ``bmm`` s;
- the task head (peft's ``modules_to_save``) and the attention core run per client on its own rows
  at its own width (attention has no weights to share, and its dropout must see the client's shape;
  the head is a few hundred FLOPs a row: one ``bmm`` over stacked heads was tried and only changed
  bf16 rounding against the sequential ``F.linear``);
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
from dataclasses import dataclass

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
    current: int | None = None  # the client whose rows alone are in flight (the head)

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

    def narrow(self, shape: torch.Size, j: int) -> tuple:
        """Client ``j``'s own width in one client's block of shape ``shape``: every dimension of size
        ``L`` but the first cut to the client's width."""
        return (slice(None), *(slice(0, self.widths[j]) if n == self.width else slice(None) for n in shape[1:]))

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t``'s rows per client (views; their backward is one concatenation, not K scatters)."""
        if self.current is not None:
            return [t]
        if t.shape[0] != self.rows * len(self.params):  # a layout this module does not know: never guess
            raise ColoraError(f"engine.fuse: a {tuple(t.shape)} tensor inside the model does not hold the clients' "
                              f"{len(self.params)} x {self.rows} rows first; set engine.fuse=1 for this model")
        return list(t.split(self.rows))

    def segments(self) -> list[int]:
        return list(range(len(self.params))) if self.current is None else [self.current]


_STEP: FusedStep | None = None  # the fused step in flight (None: every patched layer runs as peft wrote it)


def _dropout_forward(module: torch.nn.Dropout):
    def forward(x: torch.Tensor) -> torch.Tensor:
        step = _STEP
        if step is None or not module.training or module.p == 0:
            return F.dropout(x, module.p, module.training, module.inplace)
        # The scaled mask of each client's own region, drawn by the very kernel a sequential dropout
        # of that shape runs (dropout of ones = mask / (1 - p)); 1 on padding. No autograd on it.
        noise = torch.ones_like(x)
        for j, block in zip(step.segments(), step.split(noise)):
            idx = step.narrow(block.shape, j)
            with step.client(j) if step.current is None else contextlib.nullcontext():
                block[idx] = F.dropout(torch.ones(block[idx].shape, dtype=x.dtype, device=x.device), module.p, True)
        return x * noise
    return forward


def _lora_forward(layer: LoraLinear, prefix: str, original):
    dropout = layer.lora_dropout["default"]

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        step = _STEP
        if step is None:
            return original(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)  # the frozen GEMM, once for all K clients' rows
        clients = step.segments()
        a = [step.params[j][f"{prefix}.lora_A.weight"] for j in clients]  # r_k x d_in
        b = [step.params[j][f"{prefix}.lora_B.weight"] for j in clients]  # d_out x r_k
        r_max = max(t.shape[0] for t in a)
        a = torch.stack([t if t.shape[0] == r_max else F.pad(t, (0, 0, 0, r_max - t.shape[0])) for t in a])  # K x r_max x d_in
        b = torch.stack([t if t.shape[1] == r_max else F.pad(t, (0, r_max - t.shape[1])) for t in b])  # K x d_out x r_max
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
        for j, rows in zip(step.segments(), step.split(x)):
            params = {n: step.params[j][f"{prefix}.{n}"] for n in names}
            with step.client(j) if step.current is None else contextlib.nullcontext():
                outs.append(torch.func.functional_call(module, params, (rows, *args), kwargs))
        return torch.cat(outs)
    return forward


def _attention(original_for):
    def attention(module, query, key, value, attention_mask, **kwargs):
        step, original = _STEP, original_for(module)
        if step is None or step.current is not None:
            return original(module, query, key, value, attention_mask, **kwargs)
        # B x heads x L x d -> each client's rows at its own width; one mask may serve every row
        masks = [None] * len(step.params) if attention_mask is None else (
            step.split(attention_mask) if attention_mask.shape[0] > 1 else [attention_mask] * len(step.params))
        outs = []
        for j, q, k, v, mask in zip(step.segments(), step.split(query), step.split(key), step.split(value), masks):
            own = step.narrow(q.shape, j)
            with step.client(j):
                out, _ = original(module, q[own], k[own], v[own], None if mask is None else mask[step.narrow(mask.shape, j)],
                                  **kwargs)  # b x L_k x heads x d
            outs.append(out)
        return pad_width(outs, step.width), None
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


def concat_batches(batches: list[dict[str, torch.Tensor]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Client-major rows, each batch right-padded to ``width`` (pads are masked out of attention;
    token labels padded with -100, i.e. not scored)."""
    pads = {"input_ids": pad_id, "labels": -100}
    return {k: torch.cat([F.pad(b[k], (0, width - b[k].shape[1]), value=pads.get(k, 0)) if b[k].ndim > 1 else b[k]
                          for b in batches]) for k in batches[0]}


def pad_width(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-client ``b x L_k x ...`` blocks (activations, their gradients) padded to ``width`` and
    concatenated: the layout of a fused pass."""
    return torch.cat([F.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1])) for t in tensors])


def lora_scaling(model, adapter: str) -> dict[str, float]:
    """Each LoRA layer's scaling (alpha / rank) for peft adapter ``adapter``, by layer name."""
    return {n: float(m.scaling[adapter]) for n, m in model.named_modules() if isinstance(m, LoraLinear) and adapter in m.scaling}


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
