import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter (as in tests/); it must
# be set before fastkd.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
