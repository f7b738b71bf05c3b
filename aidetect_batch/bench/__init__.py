"""Not product code: the benchmark suites, the offline demo, and throwaway C2PA credentials.

May import: every package; only the CLI and the tests import it.
"""
