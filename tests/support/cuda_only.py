"""pytest plugin (`-p cuda_only`, tests/ on sys.path): keep only the tests that are skipped
without a CUDA GPU (a skipif mark whose reason names CUDA or a GPU). tools.gpu_check runs
the suite this way on a GPU machine."""
import re

_GPU = re.compile(r"cuda|gpu", re.IGNORECASE)


def _needs_cuda(item) -> bool:
    return any(_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if _needs_cuda(i)]
    config.hook.pytest_deselected(items=[i for i in items if not _needs_cuda(i)])
    items[:] = keep
