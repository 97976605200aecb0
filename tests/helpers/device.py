"""Where the Triton kernel tests run: compiled on a CUDA device when there is one, otherwise on CPU tensors
under Triton's interpreter (also where TRITON_INTERPRET=1 is set explicitly).

Decided from torch alone: ``import torch`` and ``torch.cuda.is_available()`` do not import triton, and
Triton fixes interpreted vs compiled when ``@triton.jit`` runs, so tests/conftest.py sets TRITON_INTERPRET
from ``INTERPRET`` before anything imports triton.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
