"""Triton kernels of fastkd, installed as ``fastkd.kernels``; one module per op family.

Kernels take plain tensors and know nothing of the modules above them.
"""
