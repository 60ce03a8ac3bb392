"""The VQ codebook on the camera: code vectors -> nearest codeword indices, and back (numpy, every backend)."""

from __future__ import annotations

import numpy as np


def nearest_codewords(codes: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes (D, h, w), codebook (K, D), both L2-normalised -> (indices uint16 (h, w), 1 - cosine (h, w))."""
    d, h, w = codes.shape
    flat = codes.reshape(d, h * w)
    norms = np.linalg.norm(flat, axis=0, keepdims=True)
    flat = flat / np.maximum(norms, 1e-12)  # int8 outputs are only approximately unit length
    sims = codebook @ flat  # (K, h*w)
    idx = sims.argmax(axis=0)
    best = sims[idx, np.arange(h * w)]
    return idx.astype(np.uint16).reshape(h, w), (1.0 - best).astype(np.float32).reshape(h, w)


class VectorQuantizer:
    """`nearest` and `lookup` are a pair: ``lookup(nearest(codes)[0])`` is the codewords the cloud decodes."""

    def __init__(self, codebook: np.ndarray):
        self.codebook = np.asarray(codebook, np.float32)  # (K, D), rows L2-normalised

    @property
    def size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def code_dim(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def index_bits(self) -> int:
        """Bits of one raw index (log2 of the codebook size), as the stream header records it."""
        return int(np.log2(self.size))

    def nearest(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """codes float32 (D, h, w) -> (indices uint16 (h, w), quantisation error 1 - cosine (h, w))."""
        return nearest_codewords(np.asarray(codes, np.float32), self.codebook)

    def distance(self, codes: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """1 - cosine between each code vector (D, h, w) and the codeword `indices` (h, w) names: how far a
        frame's features are from a token it might keep (inter frames keep a reference's token when close)."""
        codes = np.asarray(codes, np.float32)
        norms = np.maximum(np.linalg.norm(codes, axis=0), 1e-12)
        words = self.codebook[np.asarray(indices, np.int64)]  # (h, w, D)
        return (1.0 - np.einsum("dhw,hwd->hw", codes, words) / norms).astype(np.float32)

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """indices (h, w) -> codewords float32 (D, h, w)."""
        return np.moveaxis(self.codebook[np.asarray(indices, np.int64)], -1, 0)


__all__ = ["VectorQuantizer", "nearest_codewords"]
