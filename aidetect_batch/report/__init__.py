"""What a person reads from a scan's Parquet: the summary, the HTML page, and repost groups.

May import: ``inputs``, ``media`` and the top-level base modules.
"""
