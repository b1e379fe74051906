"""The one definition of "is there a CUDA GPU" for the tests. A GPU-only test is marked
`@needs_cuda` (or parametrized over DEVICES / DALI_DEVICES, or takes the `device` fixture of
conftest.py): it is skipped without CUDA, and the `cuda_only` plugin (tools.gpu_check) finds
it by this skip reason."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]         # torch device names
DALI_DEVICES = ["cpu", pytest.param("gpu", marks=needs_cuda)]     # DALI backend names
