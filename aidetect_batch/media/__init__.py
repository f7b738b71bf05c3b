"""Bytes to pixels and what the bytes say: decoding, provenance checks, PDQ hashes, perturbations.

May import: the top-level ``errors``, ``schema`` and ``storage`` modules only.
"""
