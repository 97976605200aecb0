"""Triton kernels for the CUDA backend (installed as `fastclip.kernels`), one file per op."""
