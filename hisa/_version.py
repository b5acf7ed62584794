"""The package version: the one place it is written (pyproject.toml reads it, setuptools dynamic)."""
__version__ = "0.2.0.dev0"
