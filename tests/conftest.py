import os

import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. This must be set
# before triton compiles (decorates) any kernel, i.e. before fastkd.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
