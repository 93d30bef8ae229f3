"""Aggregation time of the ``svd`` rule: factored SVD vs the naive dense SVD (one run, prints a table).

100 clients with LoRA ranks cycling through {2, 4, 8} (sum of ranks 466) on one 4096 x 4096 layer.
- naive: form the dense mean update ΔW = sum_k w_k s_k B_k A_k (4096 x 4096, one matrix product of
  the stacked factors) and take its full SVD;
- factored (``colora.lowrank``): QR of the stacked B's (4096 x 464) and A's, SVD of the 464 x 464 core;
- the whole ``svd`` aggregation rule (factored SVD + re-splitting at rank 8 + the head).
Both SVDs run in float64 with the same thread policy (LAPACK on one thread, products on --threads;
see ``colora.lowrank.lapack_single_thread``). Also checks that the two agree (top singular values,
rank-8 truncation).

    python benchmarks/svd_speed.py [--clients 100] [--dim 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from colora.aggregation.svd import svd
from colora.lowrank import factored_svd, lapack_single_thread, stack_factors

PREFIX = "base_model.model.layer.q"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ranks = [(2, 4, 8)[k % 3] for k in range(args.clients)]
    d = args.dim
    bs = [torch.randn(d, r, generator=g) * 0.01 for r in ranks]  # float32, as clients send them
    as_ = [torch.randn(r, d, generator=g) * d**-0.5 for r in ranks]
    sizes = torch.randint(50, 500, (args.clients,), generator=g).double()
    w = (sizes / sizes.sum()).tolist()
    folded = [wk * args.alpha / r for wk, r in zip(w, ranks)]

    t0 = time.perf_counter()
    u, s, vh = factored_svd(*stack_factors(bs, as_, folded))
    t_factored = time.perf_counter() - t0

    states = [{f"{PREFIX}.lora_A.weight": a, f"{PREFIX}.lora_B.weight": b, "base_model.model.classifier.weight": torch.zeros(2, 64)}
              for a, b in zip(as_, bs)]
    t0 = time.perf_counter()
    glob = svd(states, sizes.tolist(), args.alpha, rank=8)
    t_rule = time.perf_counter() - t0

    t0 = time.perf_counter()
    bcat, acat = stack_factors(bs, as_, folded)
    dense = bcat.double() @ acat.double()  # 4096 x 4096 float64: 134 MB
    t_form = time.perf_counter() - t0
    t0 = time.perf_counter()
    with lapack_single_thread():
        u_n, s_n, vh_n = torch.linalg.svd(dense, full_matrices=False)
    t_naive = time.perf_counter() - t0

    k = sum(ranks)
    sv_err = float((s[:k] - s_n[:k]).abs().max() / s_n[0])
    top8 = u_n[:, :8] @ torch.diag(s_n[:8]) @ vh_n[:8]
    mine = args.alpha / 8 * glob[f"{PREFIX}.lora_B.weight"].double() @ glob[f"{PREFIX}.lora_A.weight"].double()
    trunc_err = float((mine - top8).norm() / top8.norm())
    print(f"\n{args.clients} clients, ranks {{2,4,8}} (sum {k}), one {d}x{d} layer, float64 SVDs, "
          f"LAPACK on 1 thread, products on {torch.get_num_threads()}")
    print(f"{'path':<46}{'seconds':>10}")
    print(f"{'naive: form dense mean ΔW':<46}{t_form:>10.3f}")
    print(f"{'naive: full SVD of the dense ΔW':<46}{t_naive:>10.3f}")
    print(f"{'naive total':<46}{t_form + t_naive:>10.3f}")
    print(f"{'factored SVD (QR + {0}x{0} core)'.format(k):<46}{t_factored:>10.3f}")
    print(f"{'svd rule end to end (factored, split at r=8)':<46}{t_rule:>10.3f}")
    print(f"{'ratio naive total / factored':<46}{(t_form + t_naive) / t_factored:>10.1f}x")
    print(f"agreement: max |singular value diff| / s_max = {sv_err:.1e}; rank-8 truncation rel. error = {trunc_err:.1e}")


if __name__ == "__main__":
    main()
