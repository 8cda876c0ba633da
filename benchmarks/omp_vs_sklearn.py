"""Our batched OMP (robust_surgery.reprogram.omp) against scikit-learn's orthogonal_mp on R2DL's
problem: 21 target tokens, k = 10 atoms out of a 30522 × 384 vocabulary (random here). Prints both
times, the ratio, and whether the supports agree (scikit-learn on the column-normalised
dictionary, which is what our selection rule equals). Run: python benchmarks/omp_vs_sklearn.py
"""
import time, torch, numpy as np, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from robust_surgery.reprogram.omp import omp
from sklearn.linear_model import orthogonal_mp
torch.manual_seed(0)
V, H, T, k = 30522, 384, 21, 10
D = torch.randn(V, H)
S = torch.randn(T, H)
t = time.perf_counter(); idx, val = omp(S, D, k); ours = time.perf_counter() - t
Dn = (D / D.norm(dim=1, keepdim=True)).double().numpy().T  # (H, V), unit columns
t = time.perf_counter(); coef = orthogonal_mp(Dn, S.double().numpy().T, n_nonzero_coefs=k); sk = time.perf_counter() - t
sk_idx = [sorted(np.nonzero(coef[:, j])[0].tolist()) for j in range(T)]
same = sum(sorted(idx[j].tolist()) == sk_idx[j] for j in range(T))
from robust_surgery.nn.backends.c import cpu_features
info = cpu_features()
print(f"CPU: {info['model']} ({info['isa']}), {torch.get_num_threads()} threads")
print(f"ours {ours:.3f} s, sklearn orthogonal_mp {sk:.3f} s (x{sk / ours:.1f}), same support {same}/{T}")
