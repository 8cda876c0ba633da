"""Direct reference NRPM, written the way the original release computes it.

Every product term is materialised (B x O x D for Linear, one output position at a time for
Conv) and autograd runs through the whole unrolled loop. Slow and memory-hungry on purpose:
it is the yardstick the library's chunked implementation must match.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def reweight(dist, norm, eps, gamma=4.0, delta=3.0):
    if norm == "L2":
        return torch.ones_like(dist)
    if norm == "L1":
        return 1.0 / (dist + eps)
    if norm == "MCP":
        return torch.maximum(1.0 / (dist + eps) - 1.0 / gamma, torch.full_like(dist, eps))
    if norm == "Huber":
        return torch.minimum(delta / (dist + eps), torch.ones_like(dist))
    if norm == "HM":
        return torch.clamp(delta / (gamma - delta) * (gamma / (dist + eps) - 1.0), eps, 1.0)
    raise ValueError(norm)


def robust_sum(u, K, norm, eps, gamma=4.0, delta=3.0):
    """u: (..., D) product terms -> (..., ) z_NRPM after K IRLS steps from z0 = sum(u)."""
    D = u.shape[-1]
    z = u.sum(-1)
    for _ in range(K):
        dist = torch.abs(u - z.unsqueeze(-1) / D)
        w = reweight(dist, norm, eps, gamma, delta)
        z = D * (w * u).sum(-1) / torch.clamp(w.abs().sum(-1), min=1e-12)
    return z


def linear(x, weight, bias, lam, K, norm, eps, gamma=4.0, delta=3.0):
    """x: (B, D), weight: (O, D) -> (B, O)."""
    u = x.unsqueeze(1) * weight.unsqueeze(0)  # B, O, D
    z_lpm = u.sum(-1)
    z = robust_sum(u, K, norm, eps, gamma, delta)
    y = lam * z_lpm + (1 - lam) * z
    return y if bias is None else y + bias


def conv(x, weight, bias, lam, K, norm, eps, stride, padding, dilation, groups, padding_mode="zeros",
         gamma=4.0, delta=3.0):
    """Any-dimensional conv by explicit loops over output positions. padding: ints per dim (symmetric)."""
    n = weight.dim() - 2
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = F.pad(x, pads, mode=mode)
    B, C = x.shape[:2]
    O = weight.shape[0]
    k = weight.shape[2:]
    out_sizes = [(xp.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(n)]
    Cg, Og = C // groups, O // groups
    out = torch.zeros(B, O, *out_sizes, dtype=x.dtype)
    cols = []
    for pos in itertools.product(*[range(s) for s in out_sizes]):
        idx = [slice(None), slice(None)] + [
            slice(pos[i] * stride[i], pos[i] * stride[i] + dilation[i] * (k[i] - 1) + 1, dilation[i]) for i in range(n)
        ]
        patch = xp[tuple(idx)]  # B, C, *k
        ys = []
        for g in range(groups):
            pg = patch[:, g * Cg:(g + 1) * Cg].reshape(B, -1)
            wg = weight[g * Og:(g + 1) * Og].reshape(Og, -1)
            ys.append(linear(pg, wg, None, lam, K, norm, eps, gamma, delta))
        cols.append(torch.cat(ys, dim=1))
    out = torch.stack(cols, dim=-1).reshape(B, O, *out_sizes)
    if bias is not None:
        out = out + bias.view(1, O, *([1] * n))
    return out


# The FGSM sweep the fidelity and evaluation tests compare with (a hand-written reference loop).
EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]


def fgsm_accuracies(model, x, y, epsilons, batch=250):
    """Plain FGSM loop: x_adv = clip(x + ε·sign(∇x CE), 0, 1); accuracy in percent per ε.

    The sign of the gradient does not depend on ε, so it is taken once per batch.
    """
    correct = [0] * len(epsilons)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].clone().requires_grad_(True)
        yb = y[i:i + batch]
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xb), yb), xb)
        with torch.no_grad():
            for j, e in enumerate(epsilons):
                xa = (xb + e * grad.sign()).clamp(0, 1)
                correct[j] += int((model(xa).argmax(1) == yb).sum())
    return [100.0 * c / len(x) for c in correct]
