"""Independent float64 implementations of the sample-quality maths, the oracles the library's
torch-fidelity numbers are checked against: FID (Heusel et al. 2017), KID (Binkowski et al. 2018,
unbiased MMD with the cubic polynomial kernel) and the Inception Score (Salimans et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between Gaussian fits (Heusel et al., Eq. 6).

    float64; the trace of the matrix square root is the sum of square roots of the eigenvalues of
    S1^{1/2} S2 S1^{1/2}, which are real and non-negative.
    """
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    trace_sqrt = torch.linalg.eigvalsh(sqrt_s1 @ s2 @ sqrt_s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def kernel_inception_distance(f1: Tensor, f2: Tensor) -> float:
    """Unbiased squared MMD with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, Eq. 4)."""
    x, y = f1.double(), f2.double()
    m, n, d = len(x), len(y), x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    sum_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2 * k_xy.mean())


def inception_score(logits: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from class logits (Salimans et al. 2016)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(logits))))
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)
    return float(kl.mean().exp())
