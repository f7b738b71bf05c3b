"""Making and judging detectors: datasets, Ray Train training, tuning, pruning, evaluation and metrics.

May import: every package but ``bench``.
"""
