"""Client work as bytes: the task a party receives and the result it sends back.

Every engine moves :class:`~colora.types.ClientTask` s and :class:`~colora.types.ClientResult` s
through these functions, in-process included, so what a worker process or a Ray actor gets is
exactly what the reference engine runs on. A message is one safetensors blob: the tensors under
prefixes (``state/``, ``anchor/``, ``delta/``, ``moments/``) and the scalar fields as JSON in the
safetensors metadata. Nothing is unpickled; a malformed blob is a :class:`MessageError`.

Optimizer moments travel flat, keyed by the adapter key they belong to
(``<key>#exp_avg``, ``<key>#exp_avg_sq``, ``<key>#step``): AdamW's state is elementwise, so a
client's moments are 2x its adapter plus one scalar per tensor, and they fit any process that
holds the same adapter keys (:func:`moments_of`, :func:`load_moments`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import fields

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .types import AdapterState, ClientResult, ClientTask

_TASK_TENSORS = {"state": "state/", "prox_anchor": "anchor/", "base_delta": "delta/", "moments": "moments/",
                 "correction": "correction/"}
_RESULT_TENSORS = {"state": "state/", "moments": "moments/", "scores": "scores/"}


class MessageError(ValueError):
    """Bytes that are not a colora message of the expected kind."""


def encode(kind: str, scalars: dict, tensors: dict[str, AdapterState | None]) -> bytes:
    """One message: ``tensors`` (groups of named tensors, None groups left out) and JSON ``scalars``."""
    clash = {"kind", "groups", "order"} & scalars.keys()
    if clash:
        raise ValueError(f"message scalars {sorted(clash)}: names the message format reserves")
    flat, seen = {}, set()
    for prefix, group in tensors.items():
        for k, v in (group or {}).items():
            v = v.detach().to("cpu").contiguous()
            if v.untyped_storage().data_ptr() in seen:  # e.g. FedProx's anchor is the state sent: safetensors
                v = v.clone()                            # stores each storage once, so copy the second
            seen.add(v.untyped_storage().data_ptr())
            flat[prefix + k] = v
    present = [p for p, g in tensors.items() if g is not None]
    # The key order travels too: safetensors' reader returns keys in hash order, and order matters
    # (e.g. a compressor draws its rounding noise tensor by tensor in key order).
    meta = {"colora": json.dumps({"kind": kind, "groups": present, "order": list(flat), **scalars})}
    return safetensors_save(flat, metadata=meta)


def header(blob: bytes) -> dict:
    """The JSON scalars of a message, read from the safetensors header without loading tensors."""
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8 : 8 + size])["__metadata__"]["colora"]
        return json.loads(meta)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise MessageError(f"not a colora message ({len(blob)} bytes): {exc}") from None


def decode(blob: bytes, kind: str) -> tuple[dict, dict[str, AdapterState | None]]:
    """(scalars, tensor groups) of a message of ``kind``; groups absent from the message are None."""
    scalars = header(blob)
    if scalars.get("kind") != kind:
        raise MessageError(f"expected a {kind} message, got {scalars.get('kind')!r}")
    # Owned, writable copies in the sender's key order: safetensors' tensors are read-only views of
    # the received bytes, returned in hash order. One O(message) copy.
    loaded = safetensors_load(blob)
    order = scalars.pop("order")
    if sorted(order) != sorted(loaded):
        raise MessageError(f"{kind} message: its tensors do not match its key list")
    flat = {k: loaded[k].clone() for k in order}
    groups: dict[str, AdapterState | None] = {}
    for prefix in scalars.pop("groups"):
        groups[prefix] = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    scalars.pop("kind")
    return scalars, groups


def _split(obj, tensor_fields: dict[str, str]) -> tuple[dict, dict]:
    scalars = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in tensor_fields}
    tensors = {prefix: getattr(obj, name) for name, prefix in tensor_fields.items()}
    return scalars, tensors


def encode_task(task: ClientTask) -> bytes:
    """A task's bytes (what a client receives)."""
    return encode("task", *_split(task, _TASK_TENSORS))


def decode_task(blob: bytes) -> ClientTask:
    scalars, groups = decode(blob, "task")
    return ClientTask(**scalars, **{name: groups.get(prefix) for name, prefix in _TASK_TENSORS.items()})


def encode_result(result: ClientResult) -> bytes:
    """A result's bytes (what a client sends back)."""
    return encode("result", *_split(result, _RESULT_TENSORS))


def decode_result(blob: bytes) -> ClientResult:
    scalars, groups = decode(blob, "result")
    return ClientResult(**scalars, **{name: groups.get(prefix) for name, prefix in _RESULT_TENSORS.items()})


def moments_of(opt: torch.optim.Optimizer, keys: list[str]) -> AdapterState:
    """An optimizer's per-parameter state, flat and keyed by adapter key (``keys``: its parameters' keys, in order)."""
    sd = opt.state_dict()["state"]
    out = {}
    for i, key in enumerate(keys):
        for name, value in sd.get(i, {}).items():
            out[f"{key}#{name}"] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_moments(opt: torch.optim.Optimizer, keys: list[str], moments: AdapterState) -> bool:
    """Restore :func:`moments_of`'s output into ``opt`` (over the parameters of ``keys``).

    Returns False, leaving ``opt`` fresh, when the moments belong to other shapes (a client whose rank
    changed since, e.g. by HetLoRA pruning) or other keys."""
    params = opt.param_groups[0]["params"]
    state: dict[int, dict] = {}
    for i, key in enumerate(keys):
        entry = {k.rpartition("#")[2]: v for k, v in moments.items() if k.rpartition("#")[0] == key}
        if not entry:
            continue
        if any(v.ndim > 0 and v.shape != params[i].shape for v in entry.values()):
            return False
        state[i] = entry
    if sum(len(e) for e in state.values()) != len(moments):
        return False
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return True


def bundle(blobs: list[bytes]) -> bytes:
    """Several messages as one (a fused group's tasks, results or split messages): each blob a uint8
    tensor, in order; the header marks it as a bundle (:func:`is_bundle`)."""
    parts = {str(i): torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)
             for i, b in enumerate(blobs)}
    return safetensors_save(parts, metadata={"colora": json.dumps({"kind": "bundle", "size": len(blobs)})})


def is_bundle(blob: bytes) -> bool:
    """Whether ``blob`` is a :func:`bundle` (read from its header only)."""
    try:
        return header(blob).get("kind") == "bundle"
    except MessageError:
        return False


def unbundle(blob: bytes) -> list[bytes]:
    """The messages of :func:`bundle`, in order."""
    if not is_bundle(blob):
        raise MessageError(f"not a message bundle ({len(blob)} bytes)")
    parts = safetensors_load(blob)
    if sorted(parts) != sorted(str(i) for i in range(header(blob)["size"])):
        raise MessageError("a message bundle whose parts are not numbered 0 .. n-1")
    return [parts[str(i)].numpy().tobytes() for i in range(len(parts))]
