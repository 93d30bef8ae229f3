"""Aggregation rules and server optimizers against hand-computed tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colora.aggregation import fedit, product, server_step
from colora.config import ColoraError, FederationConfig
from colora.lowrank import factored_svd, stack_factors

P = "base_model.model.enc.q"
A, B, H = f"{P}.lora_A.weight", f"{P}.lora_B.weight", "base_model.model.classifier.weight"


def _state(a, b, h):
    return {A: torch.tensor(a, dtype=torch.float64), B: torch.tensor(b, dtype=torch.float64), H: torch.tensor(h, dtype=torch.float64)}


def test_fedit_is_the_weighted_mean_by_key():
    s1 = _state([[1.0, 2.0]], [[1.0], [0.0]], [3.0])
    s2 = _state([[3.0, 0.0]], [[0.0], [2.0]], [6.0])
    out = fedit([s1, s2], [1.0, 3.0])  # weights 1/4, 3/4
    assert torch.equal(out[A], torch.tensor([[2.5, 0.5]], dtype=torch.float64))
    assert torch.equal(out[B], torch.tensor([[0.25], [1.5]], dtype=torch.float64))
    assert torch.equal(out[H], torch.tensor([5.25], dtype=torch.float64))
    # the known bias: mean(B) mean(A) != mean(B A)
    exact = 0.25 * s1[B] @ s1[A] + 0.75 * s2[B] @ s2[A]
    assert not torch.allclose(out[B] @ out[A], exact)
    # and the identity DESIGN.md states: mean(B)mean(A) - mean(BA) = -mean((B - B̄)(A - Ā))
    cov = 0.25 * (s1[B] - out[B]) @ (s1[A] - out[A]) + 0.75 * (s2[B] - out[B]) @ (s2[A] - out[A])
    assert torch.allclose(out[B] @ out[A] - exact, -cov, atol=1e-12)


def test_fedit_rejects_mixed_ranks_with_a_pointer_to_the_right_rules():
    s1 = {A: torch.zeros(2, 4), B: torch.zeros(3, 2)}
    s2 = {A: torch.zeros(4, 4), B: torch.zeros(3, 4)}
    with pytest.raises(ColoraError, match="zero_pad, svd or stack"):
        fedit([s1, s2], [1.0, 1.0])


def test_product_is_the_exact_mean_of_products_when_it_fits_the_rank():
    g = torch.Generator().manual_seed(0)
    a_shared = torch.randn(2, 5, generator=g, dtype=torch.float64)  # same A: the mean has rank <= 2
    states = [{A: a_shared, B: torch.randn(4, 2, generator=g, dtype=torch.float64), H: torch.randn(3, generator=g, dtype=torch.float64)} for _ in range(3)]
    w = [2.0, 1.0, 1.0]
    out = product(states, w)
    exact = sum(wi / 4 * s[B] @ s[A] for wi, s in zip(w, states))
    assert torch.allclose(out[B] @ out[A], exact, atol=1e-12)
    assert out[A].shape == (2, 5) and out[B].shape == (4, 2)
    assert torch.allclose(out[H], sum(wi / 4 * s[H] for wi, s in zip(w, states)))


def test_product_is_the_best_rank_r_approximation_otherwise():
    g = torch.Generator().manual_seed(1)
    states = [{A: torch.randn(2, 6, generator=g, dtype=torch.float64), B: torch.randn(5, 2, generator=g, dtype=torch.float64)} for _ in range(3)]
    out = product(states, [1.0, 1.0, 1.0])
    exact = sum(s[B] @ s[A] for s in states) / 3
    u, s, vh = torch.linalg.svd(exact)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    assert torch.allclose(out[B] @ out[A], best, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 9), st.integers(2, 9), st.integers(0, 2**16))
def test_factored_svd_equals_naive_svd(k, r, d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for _ in range(k)]
    as_ = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for _ in range(k)]
    w = torch.rand(k, generator=g, dtype=torch.float64).tolist()
    bcat, acat = stack_factors(bs, as_, w)
    dense = sum(wi * b @ a for wi, b, a in zip(w, bs, as_))
    u, s, vh = factored_svd(bcat, acat)
    assert torch.allclose(u @ torch.diag(s) @ vh, dense, atol=1e-9)
    s_naive = torch.linalg.svdvals(dense)
    n = min(len(s), len(s_naive))
    assert torch.allclose(s[:n], s_naive[:n], atol=1e-9)


def _fed(**kw):
    return FederationConfig(**kw)


def test_server_optimizers_hand_computed():
    x = {"w": torch.tensor([1.0, -2.0])}
    agg = {"w": torch.tensor([0.5, -1.0])}  # pseudo-gradient g = x - agg = [0.5, -1.0]
    same, st0 = server_step(_fed(), x, agg, {})
    assert same is agg and st0 == {}
    new, st1 = server_step(_fed(server_optimizer="fedavgm", server_lr=2.0, server_momentum=0.5), x, agg, {})
    assert torch.allclose(new["w"], torch.tensor([0.0, 0.0]))  # x - 2 * g
    new2, _ = server_step(_fed(server_optimizer="fedavgm", server_lr=2.0, server_momentum=0.5), new, agg, st1)
    # g2 = new - agg = [-0.5, 1.0]; m = 0.5 * [0.5, -1] + g2 = [-0.25, 0.5]; x = new - 2 m
    assert torch.allclose(new2["w"], torch.tensor([0.5, -1.0]))
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    new, st_adam = server_step(_fed(server_optimizer="fedadam", server_lr=lr, server_momentum=b1, server_beta2=b2, server_tau=tau), x, agg, {})
    g = torch.tensor([0.5, -1.0])
    m = (1 - b1) * g
    v = b2 * tau**2 + (1 - b2) * g * g
    assert torch.allclose(new["w"], x["w"] - lr * m / (v.sqrt() + tau))
    assert torch.allclose(st_adam["v"]["w"], v)
    new, st_yogi = server_step(_fed(server_optimizer="fedyogi", server_lr=lr, server_momentum=b1, server_beta2=b2, server_tau=tau), x, agg, {})
    v_y = tau**2 - (1 - b2) * g * g * torch.sign(tau**2 - g * g)
    assert torch.allclose(st_yogi["v"]["w"], v_y)
    assert torch.allclose(new["w"], x["w"] - lr * m / (v_y.sqrt() + tau))
