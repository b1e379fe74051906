"""What DALI's GPU kernels accept, and a CPU-only check that our GPU graphs respect it.

`GPU_KERNELS` is the one table (docs/dali_gpu_kernels.md is generated from it by
`render_table`; a test keeps the two equal): per DALI operator (its schema name) the input
types its GPU kernel is compiled for and the layouts it takes, read from NVIDIA/DALI's
sources (`source`) and checked against the type instantiations (RTTI names) inside the 2.4
wheel's libdali_operators.so where the kernel has them.

`trace_gpu_graph(build)` traces a pipeline builder without building it (no GPU needed) and
lets DALI's own output-metadata inference (`OpSpec.InferOutputMetadata`) carry dtypes and
layouts through the graph, so every GPU operator's input dtype is known symbolically;
`check_gpu_graph` compares them with the table. Example: the training pipeline's erase on
float16 images is reported as "Erase (fn.erase) on gpu: input 0 is FLOAT16, the GPU kernel
takes only UINT8, ..., FLOAT" (DALI's CPU erase has float16, its GPU erase does not).
The tracing hooks use DALI internals (the operator-instance and pipeline classes); they live
here only and fail with a clear message on a DALI whose internals differ.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipelines.compat import require_dali_graph_internals

__all__ = ["KernelRow", "GPU_KERNELS", "FedOp", "trace_gpu_graph", "check_gpu_graph",
           "render_table", "DALI_SOURCE"]

DALI_SOURCE = "https://github.com/NVIDIA/DALI"
_INTS = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
_ANY = None                                  # no restriction on the input type


@dataclass(frozen=True)
class KernelRow:
    """One DALI operator's GPU kernel: `types` of the checked inputs (None: any type),
    `layouts` it takes (text for the doc), `source` (path in NVIDIA/DALI), `inputs`: which
    regular inputs are checked ("first": the data input, "all": every input)."""

    op: str
    types: tuple[str, ...] | None
    layouts: str
    source: str
    inputs: str = "first"
    note: str = ""


_ROWS = [
    # decoders: the input is the encoded file (bytes), decoded on the GPU (nvJPEG / nvImageCodec)
    ("decoders__Image", KernelRow("fn.decoders.image (mixed)", ("UINT8",), "encoded bytes (1-D)",
                                  "dali/operators/imgcodec/image_decoder.h")),
    ("decoders__ImageRandomCrop", KernelRow(
        "fn.decoders.image_random_crop (mixed)", ("UINT8",), "encoded bytes (1-D)",
        "dali/operators/imgcodec/image_decoder.h")),
    ("Resize", KernelRow("fn.resize", ("UINT8", "INT16", "UINT16", "FLOAT"),
                         "HWC, CHW (2-D/3-D spatial, channel first or last)",
                         "dali/operators/image/resize/resize_base.cc",
                         note="output: the input type or float")),
    ("CropMirrorNormalize", KernelRow(
        "fn.crop_mirror_normalize", ("UINT8", "INT16", "UINT16", "INT32", "FLOAT", "FLOAT16"),
        "HWC, CHW (fast path: uint8 HWC -> float/float16 CHW or HWC)",
        "dali/operators/image/crop/new_crop_mirror_normalize.cu",
        note="output: float, float16, uint8, int8")),
    ("WarpAffine", KernelRow("fn.warp_affine", ("UINT8", "INT16", "INT32", "FLOAT"),
                             "HWC (2-D), DHWC (3-D)", "dali/operators/image/remap/warp.h",
                             note="output: the input type or float; fill_value is one scalar")),
    ("Filter", KernelRow("fn.filter", ("UINT8", "INT8", "UINT16", "INT16", "FLOAT16", "FLOAT"),
                         "HWC, HW, CHW (any layout with H and W)",
                         "dali/operators/image/convolution/filter.h",
                         note="filter (2nd input): float")),
    ("GaussianBlur", KernelRow("fn.gaussian_blur", _INTS + ("FLOAT", "FLOAT64"),
                               "HWC, CHW, HW (1-3 spatial axes)",
                               "dali/operators/image/convolution/gaussian_blur.h",
                               note="no float16 on the GPU in 2.4")),
    ("Equalize", KernelRow("fn.equalize", ("UINT8",), "HWC, HW",
                           "dali/operators/image/color/equalize.cu",
                           note="unused: RandAugment's Equalize is a torch kernel (Pillow's)")),
    ("Flip", KernelRow("fn.flip (the flip before RandAugment)", _ANY, "HWC, CHW, (F)(D)HWC",
                       "dali/operators/generic/flip.cu", note="DALI_TYPE_SWITCH: every type")),
    ("Brightness", KernelRow("fn.brightness", ("UINT8", "INT16", "INT32", "FLOAT"),
                             "HWC, CHW, FHWC (3-D/4-D)",
                             "dali/operators/image/color/brightness_contrast.cu",
                             note="no float16 on the GPU in 2.4")),
    ("Saturation", KernelRow("fn.saturation", ("UINT8", "INT16", "INT32", "FLOAT", "FLOAT16"),
                             "HWC (3 channels)", "dali/operators/image/color/color_twist.h")),
    ("Erase", KernelRow("fn.erase", _INTS + ("FLOAT",), "any with 'C' first or last, or no C",
                        "dali/operators/generic/erase/erase.cu",
                        note="no float16 on the GPU (the CPU kernel has it)")),
    ("PermuteBatch", KernelRow("fn.permute_batch (MaskMix labels_b)", _ANY, "any",
                               "dali/operators/generic/permute_batch.cc",
                               note="byte copies of whole samples")),
    ("Slice", KernelRow("fn.slice", _ANY, "any", "dali/operators/generic/slice/slice_base.cu")),
    ("Cast", KernelRow("fn.cast", _ANY, "any", "dali/operators/generic/cast.cu")),
    ("CastLike", KernelRow("fn.cast_like", _ANY, "any", "dali/operators/generic/cast.cu")),
    ("_ArithmeticGenericOp", KernelRow(
        "arithmetic (+ - * / & | ^, comparisons, dali.math)", ("BOOL",) + _INTS + (
            "FLOAT", "FLOAT64"), "any (broadcasting)",
        "dali/operators/math/expressions/arithmetic_meta.h", inputs="all",
        note="no float16 on either backend")),
    ("reductions__Min", KernelRow("fn.reductions.min", _INTS + ("FLOAT",), "any",
                                  "dali/operators/generic/reduce/reduce.h")),
    ("reductions__Max", KernelRow("fn.reductions.max", _INTS + ("FLOAT",), "any",
                                  "dali/operators/generic/reduce/reduce.h")),
    ("reductions__Sum", KernelRow("fn.reductions.sum", _INTS + ("FLOAT",), "any",
                                  "dali/operators/generic/reduce/reduce.h")),
    ("reductions__Mean", KernelRow("fn.reductions.mean", _INTS + ("FLOAT",), "any",
                                   "dali/operators/generic/reduce/mean_kernel.h")),
    ("random__Normal", KernelRow("fn.random.normal (shape from the argument)", _ANY, "-",
                                 "dali/operators/random/normal_distribution_op.cu",
                                 note="output float32")),
    ("DLTensorPythonFunctionImpl", KernelRow(
        "fn.dl_tensor_python_function", _ANY, "any",
        "dali/operators/python_function/dltensor_function.cc", note="DLPack: torch sees it")),
    ("DLTensorPythonFunction", KernelRow(
        "fn.dl_tensor_python_function", _ANY, "any",
        "dali/operators/python_function/dltensor_function.cc",
        note="DLPack: torch sees it; ours (MaskMix, Equalize, erasing) keep the image's type")),
    ("_conditional__Split", KernelRow("if/else (conditional split)", _ANY, "any",
                                      "dali/operators/generic/split_merge.cc")),
    ("_conditional__Merge", KernelRow("if/else (conditional merge)", _ANY, "any",
                                      "dali/operators/generic/split_merge.cc")),
    ("MakeContiguous", KernelRow(".gpu() / contiguous copy", _ANY, "any",
                                 "dali/pipeline/operator/builtin/make_contiguous.cu")),
    ("Reshape", KernelRow("fn.reshape", _ANY, "any", "dali/operators/generic/reshape.cu")),
    ("Stack", KernelRow("fn.stack", _ANY, "any", "dali/operators/generic/join.cu")),
    ("Cat", KernelRow("fn.cat", _ANY, "any", "dali/operators/generic/join.cu")),
    ("ExternalSource", KernelRow("fn.external_source", _ANY, "any",
                                 "dali/pipeline/operator/builtin/external_source.cu")),
]
GPU_KERNELS: dict[str, KernelRow] = dict(_ROWS)
"""DALI schema name -> its GPU kernel's inputs (the table of docs/dali_gpu_kernels.md)."""


@dataclass(frozen=True)
class FedOp:
    """One GPU (or mixed) operator of a traced graph and what it is fed: per regular input
    (dtype name or None when unknown, layout or None, device)."""

    schema: str
    device: str
    inputs: tuple[tuple[str | None, str | None, str], ...]
    origin: str


# DALI 2.4 infers no output dtype for the reductions; its rules for the ones we use ("same":
# the input's; sum keeps float and widens integers, which we leave unknown)
_REDUCTION_OUT = {"reductions__Min": "same", "reductions__Max": "same", "reductions__Mean": "FLOAT",
                  "reductions__Sum": "float"}


@contextlib.contextmanager
def _tracing() -> Iterator[list]:
    """Pipelines defined inside are traced, not built (`build()` only records the pipeline),
    and every operator's outputs carry DALI's inferred dtype and layout."""
    from nvidia.dali import ops as dops
    from nvidia.dali import types
    from nvidia.dali.data_node import DataNode
    from nvidia.dali.pipeline import Pipeline

    require_dali_graph_internals()           # DALI internals: pipelines/compat.py
    inst = dops._OperatorInstance
    saved = (inst._generate_outputs, dops._process_inputs, dops._process_argument_inputs,
             Pipeline.build)
    captured: list = []

    @contextlib.contextmanager
    def layouts_as_str(nodes):
        """AddInput takes a str layout, OutputDesc gives a TensorLayout: convert for the call
        and restore (the conditionals find nodes by their repr, layout included)."""
        nodes = [n for n in nodes if isinstance(n, DataNode) and n.layout is not None]
        kept = [n.layout for n in nodes]
        for n in nodes:
            n.layout = str(n.layout)
        try:
            yield
        finally:
            for n, layout in zip(nodes, kept):
                n.layout = layout

    def generate_outputs(self):
        saved[0](self)
        spec = self._spec
        try:
            spec.InferOutputMetadata()
        except Exception:                     # noqa: BLE001 (an op DALI cannot infer: unknown)
            return
        for node in self._outputs:
            _, _, node.ndim, node.dtype, node.layout = spec.OutputDesc(node.index)
            rule = _REDUCTION_OUT.get(_schema(self._op))
            if node.index == 0 and _schema(self._op) == "DLTensorPythonFunction":
                rule = "same"       # our python kernels hand the image back in its own type
            if node.dtype is None and rule is not None and spec.NumRegularInput():
                given = spec.InputDesc(0)[3]
                if rule == "same" and node.layout is None:
                    node.layout = spec.InputDesc(0)[4]
                if rule == "same" or (rule == "float" and given == types.FLOAT):
                    node.dtype = given
                elif rule.isupper():
                    node.dtype = getattr(types, rule)

    def process_inputs(schema, spec, inputs, name):
        with layouts_as_str(inputs):
            return saved[1](schema, spec, inputs, name)

    def process_argument_inputs(schema, spec, kwargs, name):
        with layouts_as_str(kwargs.values()):
            return saved[2](schema, spec, kwargs, name)

    inst._generate_outputs = generate_outputs
    dops._process_inputs = process_inputs
    dops._process_argument_inputs = process_argument_inputs
    Pipeline.build = lambda self: captured.append(self)
    try:
        yield captured
    finally:
        inst._generate_outputs, dops._process_inputs, dops._process_argument_inputs, \
            Pipeline.build = saved


def _schema(op: Any) -> str:
    return getattr(op, "schema_name", None) or type(op).__name__   # ExternalSource has none


def _origin(spec: Any) -> str:
    """file:line of the innermost frame of this project that created the operator."""
    text = str(spec)
    files = re.search(r"_origin_stack_filename: \[(.*?)\]", text)
    lines = re.search(r"_origin_stack_lineno: \[(.*?)\]", text)
    if not files or not lines:
        return "?"
    pairs = list(zip([f.strip() for f in files.group(1).split(",") if f.strip()],
                     [n.strip() for n in lines.group(1).split(",") if n.strip()]))
    ours = [(f, n) for f, n in pairs if "site-packages" not in f] or pairs
    f, n = ours[-1]
    return f"{f.split('/pipelines/')[-1] if '/pipelines/' in f else f}:{n}"


def _name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).split(".")[-1].split(":")[0]


def trace_gpu_graph(build: Callable[[], Any]) -> list[FedOp]:
    """Call `build` (which defines and "builds" DALI pipelines, e.g. `build_train_pipeline`
    with backend="gpu") in trace mode and return each GPU/mixed operator with its inputs."""
    with _tracing() as pipes:
        build()
    if not pipes:
        raise ValueError("build() defined no DALI pipeline (it must call pipe.build())")
    fed = []
    for pipe in pipes:
        pipe._build_graph()
        for inst in pipe._ops:
            device = inst._op.device
            if device not in ("gpu", "mixed"):
                continue
            spec = inst.spec
            inputs = tuple((_name(d[3]), None if d[4] is None else str(d[4]), d[1])
                           for d in (spec.InputDesc(i) for i in range(spec.NumRegularInput())))
            fed.append(FedOp(_schema(inst._op), device, inputs, _origin(spec)))
    return fed


def check_gpu_graph(fed: list[FedOp], table: dict[str, KernelRow] | None = None) -> list[str]:
    """Every way `fed` breaks the table: an operator without a row, an input type its GPU
    kernel lacks, or an input type the trace could not establish for a restricted kernel."""
    table = GPU_KERNELS if table is None else table
    errors = []
    for op in fed:
        row = table.get(op.schema)
        where = f"{op.schema} on {op.device} ({op.origin})"
        if row is None:
            errors.append(f"{where}: not in GPU_KERNELS; read its GPU kernel in DALI's sources "
                          "and add a row (tools/gpu_kernels.py, then regenerate the doc)")
            continue
        if row.types is None:
            continue
        checked = op.inputs if row.inputs == "all" else op.inputs[:1]
        for i, (dtype, _, _) in enumerate(checked):
            if dtype is None:
                errors.append(f"{where}: input {i} has a dtype the trace cannot tell; the GPU "
                              f"kernel takes only {', '.join(row.types)}")
            elif dtype not in row.types:
                errors.append(f"{where}: input {i} is {dtype}, the GPU kernel takes only "
                              f"{', '.join(row.types)}")
    return errors


def render_table(table: dict[str, KernelRow] | None = None) -> str:
    """The markdown table of docs/dali_gpu_kernels.md."""
    table = GPU_KERNELS if table is None else table
    lines = ["| operator | DALI schema | GPU input types | layouts | source in NVIDIA/DALI | note |",
             "|---|---|---|---|---|---|"]
    for schema, row in table.items():
        types = "any" if row.types is None else ", ".join(t.lower() for t in row.types)
        if row.inputs == "all":
            types += " (every input)"
        lines.append(f"| {row.op} | `{schema}` | {types} | {row.layouts} | `{row.source}` | "
                     f"{row.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":       # python -m tools.gpu_kernels: print the doc's table
    print(render_table(), end="")
