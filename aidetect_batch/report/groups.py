"""Near-duplicate grouping of PDQ hashes: candidate pairs from a multi-index hash, then connected components.

The 256 bits are cut into ``b``-bit chunks, one faiss hash table each (``IndexBinaryMultiHash``); only
rows sharing a whole chunk with the query are compared, exactly, by Hamming distance, so no pair above
the distance is ever reported and no all-pairs comparison happens. A pair whose differing bits touch
every chunk is missed: recall falls with the distance and with the chunk width, which grows with the
row count to keep buckets small (BENCHMARKS.md measures both).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from aidetect_batch.media import pdq

# Candidate buckets hold about this many rows on average: the chunk width grows with log2(rows / this).
BUCKET_ROWS = 16
MIN_CHUNK_BITS = 16


def near_pairs(codes: np.ndarray, distance: int) -> np.ndarray:
    """Row pairs ``(i, j)``, ``i < j``, whose hashes (``(n, 32)`` uint8) differ in at most ``distance`` bits."""
    if len(codes) < 2:
        return np.empty((0, 2), np.int64)
    bits = chunk_bits(len(codes))
    index = faiss.IndexBinaryMultiHash(pdq.PDQ_BYTES * 8, (pdq.PDQ_BYTES * 8) // bits, bits)
    index.add(codes)
    lims, _, found = index.range_search(codes, distance + 1)
    query = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims.astype(np.int64)))
    keep = query < found
    return np.stack([query[keep], found[keep].astype(np.int64)], axis=1)


def chunk_bits(rows: int) -> int:
    """Bits per hash table: buckets of about :data:`BUCKET_ROWS` rows, never under 16 bits."""
    return max(MIN_CHUNK_BITS, math.ceil(math.log2(max(rows, 2) / BUCKET_ROWS)))


def components(rows: int, pairs: np.ndarray) -> np.ndarray:
    """Connected component of each of ``rows`` rows under the ``pairs`` edges (labels 0..k-1)."""
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(rows, rows))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def near_duplicate_groups(codes: np.ndarray, distance: int = pdq.MATCH_DISTANCE) -> np.ndarray:
    """Group label of each hash: connected components of the pairs within ``distance``."""
    return components(len(codes), near_pairs(codes, distance))
