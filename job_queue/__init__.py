"""labq: a small per-node GPU job queue (daemon ``labqd`` and CLI ``labq``).

Keep this module free of imports so that ``labq --help`` stays fast.
"""

__version__ = "0.1.0"
