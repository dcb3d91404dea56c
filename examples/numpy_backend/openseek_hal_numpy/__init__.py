"""Example openseek-hal backend plugin whose kernels are NumPy code (see README.md)."""

from .backend import NumpyBackend

__all__ = ["NumpyBackend"]
