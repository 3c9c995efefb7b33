import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. This must be
# set before any kernel module is imported (triton.jit reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
