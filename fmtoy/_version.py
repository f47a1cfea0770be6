"""The package version, in one place (read by fmtoy, its checkpoints and the CLI)."""

__version__ = "0.1.0"
