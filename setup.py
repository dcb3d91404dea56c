"""setuptools shim: all metadata lives in pyproject.toml (native extensions are added here)."""
from setuptools import setup

setup()
