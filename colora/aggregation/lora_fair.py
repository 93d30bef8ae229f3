"""``lora_fair`` (LoRA-FAIR, Bian et al., ICCV 2025): FedIT's averages plus a server-side residual on B.

Averaging the factors separately gives B̄·Ā, not the mean update ΔW = Σ p_k B_k A_k. LoRA-FAIR keeps
Ā and corrects B̄ by a residual ΔB chosen on the server so that (B̄ + ΔB)·Ā matches ΔW, regularized
towards ΔB = 0; the corrected pair is both the global adapter and the next round's initialization
of every client (their "initialization refinement": clients start from factors whose product is the
refined update). Here the match is in the Frobenius norm with a ridge weight λ
(``federation.lora_fair_lambda``), which has a closed form per LoRA module:

    ΔB = (ΔW - B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹,   with ΔW Āᵀ = Σ p_k B_k (A_k Āᵀ)

so nothing d_out x d_in is formed: r x r and d_out x r products only (K clients: O(K·r·(d_in + d_out))
extra work per module, no extra bytes). λ = 0 gives the best update with rows in Ā's row space; as
λ → ∞, ΔB → 0 and the rule is ``fedit``. (The paper scores the match with a similarity measure and
solves it iteratively; the least-squares form is ours.) Equal ranks only.
"""

from __future__ import annotations

import torch

from ..states import lora_pairs
from ..types import AdapterState
from .fedit import check_same_shapes, weighted_mean
from .hetero import normalized


def lora_fair(states: list[AdapterState], weights: list[float], lam: float) -> AdapterState:
    """FedIT's weighted means, each B̄ refined by the residual ΔB above."""
    check_same_shapes(states, "lora_fair")
    out = weighted_mean(states, weights)
    p = normalized(weights)
    for a_key, b_key in lora_pairs(out).values():
        a = out[a_key].double()  # r x d_in
        gram = a @ a.T  # r x r
        target = sum(w * s[b_key].double() @ (s[a_key].double() @ a.T) for w, s in zip(p, states))  # ΔW Āᵀ: d_out x r
        residual = target - out[b_key].double() @ gram
        system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
        delta = residual @ (torch.linalg.pinv(system) if lam == 0 else torch.linalg.inv(system))
        out[b_key] = (out[b_key].double() + delta).to(out[b_key].dtype)
    return out
