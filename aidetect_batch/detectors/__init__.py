"""The detectors: the architecture registry, networks, checkpoints and the preprocess policies.

Nothing outside this package names an architecture or compares a policy name.
May import: ``media`` and the top-level ``errors``, ``schema`` and ``storage`` modules.
"""
