"""A seeded pseudo-random permutation of [0, n) evaluated per index in O(1) memory.

A shuffled index array for 2T tokens / 4096 = 500M windows would take 4 GB per rank; a
4-round (unbalanced) Feistel network over the next power-of-two domain, with cycle
walking back into [0, n), is a bijection computed on the fly from (seed, epoch, stream).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_M64 = (1 << 64) - 1
_ROUNDS = 6  # alternating halves: each half is rewritten 3 times


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=4096)
def derive_key(*parts: int) -> int:
    """A 64-bit key mixing integer parts (seed, epoch, stream, ...) so nearby inputs differ fully."""
    h = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    for p in parts:
        h = _splitmix(h ^ np.array([p & _M64], dtype=np.uint64))
    return int(h[0])


def uniform01(positions: np.ndarray, key: int) -> np.ndarray:
    """Deterministic uniform floats in [0, 1), one per integer position (pure function of key)."""
    x = _splitmix(positions.astype(np.uint64) ^ np.uint64(key))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """Images of ``idx`` (int array, values in [0, n)) under the permutation of [0, n) named by ``key``."""
    idx = np.asarray(idx, dtype=np.int64)
    if n <= 1:
        return idx.copy()
    bits = (n - 1).bit_length()  # domain 2**bits < 2n: at most 2 encryptions on average
    lo_bits = bits - bits // 2
    keys = [derive_key(key, r) for r in range(_ROUNDS)]
    y = _enc(idx.astype(np.uint64), lo_bits, bits // 2, keys)
    bad = np.flatnonzero(y >= np.uint64(n))
    while len(bad) > 8:  # cycle walking: re-encrypt until back inside [0, n); a bijection on [0, n)
        y[bad] = _enc(y[bad], lo_bits, bits // 2, keys)
        bad = bad[y[bad] >= np.uint64(n)]
    for i in bad.tolist():  # the geometric tail: a few elements, cheaper one by one in Python
        v = int(y[i])
        while v >= n:
            v = _enc_int(v, lo_bits, bits // 2, keys)
        y[i] = v
    return y.astype(np.int64)


def _enc(x: np.ndarray, lo_bits: int, hi_bits: int, keys: list[int]) -> np.ndarray:
    """Unbalanced Feistel rounds on (hi, lo) halves: each round xors one half with a hash of the other."""
    lo_mask, hi_mask = np.uint64((1 << lo_bits) - 1), np.uint64((1 << hi_bits) - 1)
    hi, lo = x >> np.uint64(lo_bits), x & lo_mask
    for r, k in enumerate(keys):
        if r % 2 == 0:
            hi = hi ^ (_splitmix(lo ^ np.uint64(k)) & hi_mask)
        else:
            lo = lo ^ (_splitmix(hi ^ np.uint64(k)) & lo_mask)
    return (hi << np.uint64(lo_bits)) | lo


def _splitmix_int(x: int) -> int:
    """``_splitmix`` on one Python int (same function, for the cycle-walking tail)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _enc_int(x: int, lo_bits: int, hi_bits: int, keys: list[int]) -> int:
    """``_enc`` on one Python int."""
    lo_mask, hi_mask = (1 << lo_bits) - 1, (1 << hi_bits) - 1
    hi, lo = x >> lo_bits, x & lo_mask
    for r, k in enumerate(keys):
        if r % 2 == 0:
            hi ^= _splitmix_int(lo ^ k) & hi_mask
        else:
            lo ^= _splitmix_int(hi ^ k) & lo_mask
    return (hi << lo_bits) | lo
