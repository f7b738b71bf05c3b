"""What a job reads: listing folders, globs and prefixes, manifests, and the shards a scan streams.

May import: the top-level ``errors``, ``schema`` and ``storage`` modules only.
"""
