"""cowfs: a copy-on-write FUSE filesystem for PostgreSQL data directories."""

__version__ = "0.1.0"
