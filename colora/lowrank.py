"""Low-rank algebra on LoRA factors without forming d x d matrices.

A weighted sum of LoRA products  sum_k w_k B_k A_k  (B_k: d_out x r_k, A_k: r_k x d_in) has rank at
most R = sum_k r_k. Stacking the factors gives  Bcat @ Acat  with Bcat: d_out x R, Acat: R x d_in;
QR-factoring both leaves an R x R core whose SVD is the SVD of the sum. Cost O((d_out + d_in) R^2 + R^3)
instead of O(d_out d_in min(d_out, d_in)) for an SVD of the dense d_out x d_in matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def lapack_single_thread() -> Iterator[None]:
    """Run LAPACK factorizations (QR, SVD) on one thread, then restore the thread count.

    On a shared 2-core CPU, OpenMP threads in LAPACK's many short parallel regions wait on peers that
    the OS has descheduled. Measured here under load: QR of 4096 x 464 took 0.15 s on one thread vs
    1.4 s on two, the SVD of a 464 x 464 core 0.05 s vs 11.5 s. Matrix products keep every thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stack_factors(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bcat, Acat) with Bcat @ Acat == sum_k weights[k] * bs[k] @ as_[k]."""
    bcat = torch.cat([w * b for w, b in zip(weights, bs)], dim=1)
    acat = torch.cat(list(as_), dim=0)
    return bcat, acat


def factored_svd(bcat: torch.Tensor, acat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of ``bcat @ acat`` computed from the factors alone.

    Done in float64: the QR and small SVD are cheap, and the identities in DESIGN.md must hold to 1e-6.
    """
    with lapack_single_thread():
        qb, rb = torch.linalg.qr(bcat.double(), mode="reduced")  # d_out x R', R' x R
        qa, ra = torch.linalg.qr(acat.double().T, mode="reduced")  # d_in x R'', R'' x R
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core: R' x R''
    return qb @ u, s, vh @ qa.T


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (B, A) of U diag(S) Vh, singular values split evenly (sqrt to each side).

    When the sum has fewer than ``rank`` non-zero directions, the extra rows/columns are zero.
    """
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b.to(dtype), a.to(dtype)


# Singular values at or below RANK_RTOL * (largest one) are numerical zeros: float32 factors
# multiplied in float64 leave ~1e-16 relative noise where the true product is rank-deficient.
RANK_RTOL = 1e-9


def numerical_rank(s: torch.Tensor) -> int:
    """How many singular values in ``s`` (sorted, descending) are not numerical zeros."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > RANK_RTOL * s[0]).sum())


def product_fro_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B @ A||_F from the factors: trace((B^T B)(A A^T)), two r x r Gram matrices, no d x d product."""
    bb, aa = b.double().T @ b.double(), a.double() @ a.double().T
    return float((bb * aa).sum().clamp_min(0.0).sqrt())
