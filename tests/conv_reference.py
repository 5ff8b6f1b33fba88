"""Float64 references of the 3x3 conv and its VJP, and float32 summation bounds (tests)."""
import math

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff
# A float32 sum of n terms t, in any order, is within LAMBDA U32 sqrt(n) (|sum t| +
# sqrt(sum t^2)) of the exact sum (independent roundings of the partial sums: a random
# walk; LAMBDA = 4 standard deviations, as tests/test_torch_parity.py). Over an array the
# bound is taken in norm.
LAMBDA = 4.0


def sum_bound(n: int, total: np.ndarray, squares: np.ndarray) -> float:
    """LAMBDA U32 sqrt(n) || |total| + sqrt(squares) ||, for sums of n float32 terms."""
    return LAMBDA * U32 * math.sqrt(n) * float(np.linalg.norm(np.abs(total) + np.sqrt(squares)))


def shifted(xp: np.ndarray, a: int, b: int, h: int, w: int) -> np.ndarray:
    return xp[a:a + h, b:b + w]


def conv_float64(x, k):
    """Zero-padded 3x3 correlation and the sum of its squared terms, in float64."""
    h, w, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    y = sum(shifted(xp, a, b, h, w) @ k[a, b] for a in range(3) for b in range(3))
    sq = sum(np.square(shifted(xp, a, b, h, w)) @ np.square(k[a, b]) for a in range(3) for b in range(3))
    return y, sq


def vjp_float64(x, k, g):
    """dx and dkernel of sum(g * conv(x, k)), and the sums of their squared terms."""
    h, w, _ = x.shape
    flipped = k[::-1, ::-1].transpose(0, 1, 3, 2)
    dx, dx_sq = conv_float64(g, flipped)
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    dk = np.stack([np.stack([np.einsum("hwc,hwd->cd", shifted(xp, a, b, h, w), g) for b in range(3)])
                   for a in range(3)])
    dk_sq = np.stack([np.stack([np.einsum("hwc,hwd->cd", np.square(shifted(xp, a, b, h, w)), np.square(g))
                                for b in range(3)]) for a in range(3)])
    return dx, dx_sq, dk, dk_sq


def random_case(rng, h, w, cin, cout):
    x = rng.normal(size=(h, w, cin)).astype(np.float32)
    k = (rng.normal(size=(3, 3, cin, cout)) / math.sqrt(9 * cin)).astype(np.float32)
    return x, k
