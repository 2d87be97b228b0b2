"""Run Triton kernels on CPU (interpreter) when this machine has no CUDA; set before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
