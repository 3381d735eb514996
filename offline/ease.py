"""EASE's closed form (Steck 2019), shared by the EASE reference (offline/references.py) and the
sequential item-to-item neighbours (offline/item_neighbours.py)."""
from __future__ import annotations

import numpy as np
from scipy.linalg import lapack


def ease_weights(g: np.ndarray, lam: float) -> np.ndarray:
    """EASE closed form from the gram matrix g [n, n] (left unchanged): B [n, n] float32, zero diagonal.

    P = (G + λI)⁻¹ by Cholesky (LAPACK potrf + potri, in one n x n buffer), B = I - P diag(1/diag(P))."""
    n = len(g)
    a = np.array(g, np.float32, order="F")
    a[np.diag_indices(n)] += np.float32(lam)
    c, info = lapack.spotrf(a, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: XᵀX + {lam}·I is not positive definite (potrf info {info})")
    p, info = lapack.spotri(c, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: inverse failed (potri info {info})")
    p = p.T   # C-ordered view; potri filled p's upper triangle, i.e. this view's lower triangle
    step = 1024
    for s in range(0, n, step):   # mirror the lower triangle onto the upper, block by block
        e = min(s + step, n)
        block = p[s:e, s:e]
        block[...] = np.tril(block) + np.tril(block, -1).T
        p[s:e, e:] = p[e:, s:e].T
    diag = np.diag(p).copy()
    p /= -diag[None, :]
    p[np.diag_indices(n)] = 0.0
    return np.ascontiguousarray(p)
