"""Every private API of torch, DALI and timm that this project calls, in one place.

Each shim below checks the installed version against the versions it was verified on
(``VERIFIED``), uses the private API where it exists, and otherwise falls back to public
behaviour (slower, or a less precise error, never a different result). On a version that is
not in ``VERIFIED`` the private API is still used when present, with one ``PrivateAPIWarning``;
``tests/pipelines/test_compat.py`` fails on such a version, so a pin change is noticed before a release.
A new pin: run that test, read the private code it names, add the version here.

Private APIs in use (verified on torch 2.14.1, DALI 2.4.0; timm needs none):

``torch._C._storage_Use_Count`` -> ``storage_holders``
    How many tensors share a tensor's storage. The loader reuses a host buffer for the next
    batch only when nobody holds the previous one any more (views of it included); torch has
    no public reference count (``sys.getrefcount`` sees one Python object, not the views).
    Checked at first use by a probe (a view must raise the count, deleting it lower it).
    Fallback: ``None``; the loader then copies every batch into a fresh tensor.
``torch.ops.aten._upsample_{bicubic,bilinear}2d_aa.out`` -> ``resize_aa_into``
    The antialiased resize kernel of ``F.interpolate(antialias=True)``, written straight into
    DALI's HWC output buffer. ``interpolate`` has no ``out=``: its NCHW result plus the
    permuting copy made the CPU resize 2.6x slower (0.8 vs 2.2 ms for a 375x500 -> 224 uint8
    image here). Fallback: ``interpolate`` + copy, bitwise the same (tested).
``nvidia.dali.Pipeline._shutdown`` -> ``shutdown_pipeline``
    DALI's own teardown (``Pipeline.__del__`` calls it); DALI has no public ``close``. A
    pipeline left to the garbage collector can be torn down inside a python operator of a
    running pipeline (a deadlock), so loaders and tests shut theirs down deterministically.
    Fallback: nothing (the pipeline stops when it is collected).
``nvidia.dali._conditionals.conditionals_enabled`` -> ``conditionals_enabled``
    Whether the pipeline being defined has ``enable_conditionals=True``; RandAugment and
    random erasing need it and say so. No public getter. Fallback: ``None`` (unknown): the
    callers skip their check and DALI's own error ("DataNode was used in conditional
    context") comes at the first ``if``.
DALI graph internals (``ops._OperatorInstance._generate_outputs``, ``ops._process_inputs``,
``ops._process_argument_inputs``, ``Pipeline._build_graph``, ``Pipeline._ops``) ->
``require_dali_graph_internals``
    ``tools.gpu_kernels.trace_gpu_graph`` infers the dtype fed to every GPU operator
    without building the pipeline (no GPU needed). DALI infers dtypes only inside these
    methods. Fallback: none (the trace is a development check; it raises, naming what is
    missing).
``torch.cuda._sleep`` -> ``cuda_spin``
    Keeps the GPU busy on the current stream for a number of clock cycles, without the host
    (the GPU check's stream-ordering test). Fallback: matrix products on the stream, of a
    length that is not calibrated (the check's negative control then says whether it was
    long enough).
``torch.compile``'s ``OptimizedModule._orig_mod`` -> ``compiled_original``
    The module under ``torch.compile`` (for checkpoints with plain keys). Fallback: the
    module itself (unchanged) when the attribute is absent.
``torch.utils.data.DataLoader._iterator._shutdown_workers`` -> ``shutdown_dataloader_workers``
    Benchmarks only: stops a persistent-worker DataLoader's processes when a configuration is
    done, so that they do not compete with the next. Fallback: nothing (they stop when the
    loader is collected).

Replaced by public APIs: timm's ``VisionTransformer._pos_embed`` (train/robustness.py now runs
the public ``forward_features`` with the token selection as its ``patch_drop`` step), the
benchmark's ``DataLoader._iterator._workers`` (worker pids come from ``worker_init_fn``).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

__all__ = ["VERIFIED", "PrivateAPIWarning", "installed_versions", "unverified",
           "storage_holders", "resize_aa_into", "resize_aa_public", "shutdown_pipeline",
           "conditionals_enabled", "require_dali_graph_internals", "cuda_spin",
           "compiled_original", "shutdown_dataloader_workers"]

VERIFIED: dict[str, tuple[str, ...]] = {"torch": ("2.14.1",), "dali": ("2.4.0",)}


class PrivateAPIWarning(UserWarning):
    """A private API is used on a version it was not verified on, or is missing."""


def _base(version: str) -> str:
    return version.split("+")[0]          # "2.14.1+cu130" -> "2.14.1"


def installed_versions() -> dict[str, str]:
    """The installed versions of the packages in VERIFIED (local suffixes dropped)."""
    import nvidia.dali as dali
    import torch

    return {"torch": _base(torch.__version__), "dali": _base(dali.__version__)}


def _installed(package: str) -> str:
    if package == "torch":
        import torch

        return _base(torch.__version__)
    import nvidia.dali as dali

    return _base(dali.__version__)


def unverified() -> dict[str, str]:
    """{package: installed version} for each package whose version the shims were not
    verified on (empty on the pinned versions)."""
    return {p: v for p, v in installed_versions().items() if v not in VERIFIED[p]}


@functools.lru_cache(maxsize=None)
def _check(package: str, api: str, present: bool) -> bool:
    """Warn once per API on an unverified version or a missing symbol; return `present`."""
    version = _installed(package)
    if not present:
        warnings.warn(f"{api} is absent in {package} {version}; using the public fallback "
                      "(see pipelines/compat.py)", PrivateAPIWarning, stacklevel=3)
    elif version not in VERIFIED[package]:
        warnings.warn(f"{api} is private and was verified on {package} "
                      f"{', '.join(VERIFIED[package])}, not {version} (see pipelines/compat.py)",
                      PrivateAPIWarning, stacklevel=3)
    return present


# --- torch: storage use count ------------------------------------------------------------------
def _holders(count: Callable[[int], int], t: Any) -> int:
    storage = t.untyped_storage()
    return count(storage._cdata) - 1            # minus the `storage` object just made


@functools.lru_cache(maxsize=None)
def storage_holders() -> Callable[[Any], int] | None:
    """A function t -> how many tensors share tensor t's storage (t itself and its views), or
    None where torch offers no such count."""
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    if not _check("torch", "torch._C._storage_Use_Count", count is not None):
        return None
    holders = functools.partial(_holders, count)
    a = torch.empty(4)
    alone = holders(a)
    b = a.view(2, 2)
    shared = holders(a)
    del b
    if (alone, shared, holders(a)) != (1, 2, 1):
        warnings.warn(f"torch._C._storage_Use_Count counts differently in torch {torch.__version__}"
                      f" ({alone}, {shared}); host buffers are not reused", PrivateAPIWarning)
        return None
    return holders


# --- torch: antialiased resize into a given buffer ---------------------------------------------
def resize_aa_public(x: Any, size: tuple[int, int], mode: str, out: Any) -> Any:
    """The public way: F.interpolate(antialias=True), then a copy into `out`."""
    import torch.nn.functional as F

    return out.copy_(F.interpolate(x, size=tuple(size), mode=mode, antialias=True,
                                   align_corners=False))


def resize_aa_into(x: Any, size: tuple[int, int], mode: str, out: Any) -> Any:
    """Antialiased `mode` ("bicubic" or "bilinear") resize of x (N, C, h, w) to `size`, written
    into `out` (N, C, H, W; any strides, e.g. a permuted HWC buffer). Bitwise equal to
    F.interpolate(x, size, mode=mode, antialias=True)."""
    import torch

    name = f"_upsample_{mode}2d_aa"
    kernel = getattr(torch.ops.aten, name, None)
    if not _check("torch", f"torch.ops.aten.{name}.out", kernel is not None):
        return resize_aa_public(x, size, mode, out)
    return kernel.out(x, list(size), False, None, None, out=out)


# --- DALI: pipeline teardown, conditionals, graph internals ------------------------------------
def shutdown_pipeline(pipe: Any) -> None:
    """Stop a DALI pipeline now (its executor, threads and memory), as its __del__ would."""
    from nvidia.dali.pipeline import Pipeline

    if _check("dali", "Pipeline._shutdown", hasattr(Pipeline, "_shutdown")):
        pipe._shutdown()


def conditionals_enabled() -> bool | None:
    """Whether the pipeline being defined has enable_conditionals=True; None: unknown."""
    try:
        from nvidia.dali._conditionals import conditionals_enabled as enabled
    except ImportError:
        enabled = None
    if not _check("dali", "nvidia.dali._conditionals.conditionals_enabled", enabled is not None):
        return None
    return bool(enabled())


DALI_GRAPH_INTERNALS = (("ops", "_OperatorInstance"), ("ops", "_process_inputs"),
                        ("ops", "_process_argument_inputs"), ("Pipeline", "_build_graph"),
                        ("ops._OperatorInstance", "_generate_outputs"))


def require_dali_graph_internals() -> None:
    """Raise RuntimeError naming what is missing if DALI lacks the internals of the trace."""
    import nvidia.dali as dali
    from nvidia.dali import ops
    from nvidia.dali.pipeline import Pipeline

    owners = {"ops": ops, "Pipeline": Pipeline, "ops._OperatorInstance":
              getattr(ops, "_OperatorInstance", None)}
    missing = [f"{o}.{n}" for o, n in DALI_GRAPH_INTERNALS if not hasattr(owners[o], n)]
    if not _check("dali", "DALI graph internals", not missing):
        raise RuntimeError(f"trace_gpu_graph needs DALI 2.x internals {missing}, absent in DALI "
                           f"{dali.__version__}")


# --- torch: GPU spin, torch.compile, DataLoader workers ----------------------------------------
def cuda_spin(cycles: int) -> None:
    """Keep the current CUDA stream busy for about `cycles` GPU clock cycles (no host wait)."""
    import torch

    sleep = getattr(torch.cuda, "_sleep", None)
    if _check("torch", "torch.cuda._sleep", sleep is not None):
        sleep(cycles)
        return
    x = torch.ones(1024, 1024, device="cuda")
    for _ in range(max(1, cycles // 1_000_000)):
        x = x @ x * 1e-3


def compiled_original(model: Any) -> Any:
    """The module under torch.compile's wrapper; `model` itself when it is not compiled."""
    inner = getattr(model, "_orig_mod", None)
    if inner is None:
        return model
    _check("torch", "OptimizedModule._orig_mod", True)
    return inner


def shutdown_dataloader_workers(loader: Any) -> None:
    """Stop the worker processes of a DataLoader with persistent workers, now."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    if _check("torch", "DataLoader._iterator._shutdown_workers", hasattr(it, "_shutdown_workers")):
        it._shutdown_workers()
