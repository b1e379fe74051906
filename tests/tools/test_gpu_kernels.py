"""tools.gpu_kernels: the GPU graphs (training, validation, every augmentation op) feed each
DALI GPU operator only types its GPU kernel has, traced on the CPU; the doc is the code table;
the check catches float16 into the GPU erase (the first-GPU-batch crash it was written for)."""
from pathlib import Path

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from mixpro_dali import MixConfig
from pipelines.erasing import ERASE_MODES, random_erasing
from tools.gpu_kernels import GPU_KERNELS, check_gpu_graph, render_table, trace_gpu_graph
from pipelines.randaugment import OP_NAMES, RandAugmentPolicy, rand_augment
from pipelines.readers import Source
from pipelines.train_pipeline import TrainOptions, build_train_pipeline
from pipelines.val_pipeline import build_val_pipeline

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Source(kind="folder", root="never-read", files=("a.jpg", "b.jpg"), labels=(0, 1))


def graph(body, *, dtype=types.UINT8, layout="HWC", shape=(32, 48, 3)):
    """A GPU graph of `body` on external-source images of `dtype` moved to the GPU."""
    @pipeline_def(batch_size=2, num_threads=1, device_id=0, seed=1, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: [np.zeros(shape, np.uint8)] * 2, batch=True,
                               layout=layout, dtype=dtype)
        return body(x.gpu())

    return lambda: pipe().build()


def fed_types(fed, schema):
    return {op.inputs[0][0] for op in fed if op.schema == schema}


def test_doc_is_generated_from_the_table():
    doc = (ROOT / "docs" / "dali_gpu_kernels.md").read_text()
    assert render_table() in doc, "regenerate the table: python -m tools.gpu_kernels"


def test_training_graph_feeds_supported_types_only():
    fed = trace_gpu_graph(lambda: build_train_pipeline(
        SOURCE, batch_size=4, opts=TrainOptions(), mix_config=MixConfig.preset(
            "mixpro", image_size=224), backend="gpu", device_id=0, shard_id=0, num_shards=1,
        num_threads=1, seed=0))
    assert check_gpu_graph(fed) == []
    schemas = {op.schema for op in fed}
    assert {"decoders__ImageRandomCrop", "Resize", "CropMirrorNormalize", "Erase",
            "WarpAffine", "Filter", "Flip", "DLTensorPythonFunction"} <= schemas, schemas
    assert fed_types(fed, "Erase") == {"FLOAT"}      # float16 images, erased as float32
    assert fed_types(fed, "CropMirrorNormalize") == {"UINT8"}
    assert fed_types(fed, "Resize") == {"UINT8"}


@pytest.mark.parametrize("size", [(224, 224), (224, 192)])
def test_validation_graph_feeds_supported_types_only(size):
    fed = trace_gpu_graph(lambda: build_val_pipeline(
        SOURCE, batch_size=4, image_size=size, crop_pct=0.875, interpolation="bicubic",
        mean=(0.5,) * 3, std=(0.25,) * 3, dtype="float16", backend="gpu", device_id=0,
        shard_id=0, num_shards=1, num_threads=1))
    assert check_gpu_graph(fed) == []
    assert [op.schema for op in fed] == ["decoders__Image", "Resize", "CropMirrorNormalize"]


def test_every_randaugment_op_on_gpu_images():
    policy = RandAugmentPolicy(magnitude=9.0, num_layers=1, prob=1.0, magnitude_std=0.5,
                               transforms=OP_NAMES)
    fed = trace_gpu_graph(graph(lambda x: rand_augment(x, policy, fill=(124, 116, 104))))
    assert check_gpu_graph(fed) == []
    assert {"GaussianBlur", "Saturation", "Brightness", "WarpAffine"} <= {op.schema for op in fed}


@pytest.mark.parametrize("mode", ERASE_MODES)
@pytest.mark.parametrize("dtype", [types.FLOAT16, types.FLOAT])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_erasing_on_gpu_images_of_each_dtype(mode, dtype, layout):
    shape = (3, 24, 40) if layout == "CHW" else (24, 40, 3)
    fed = trace_gpu_graph(graph(lambda x: random_erasing(x, prob=0.5, mode=mode, layout=layout),
                                dtype=dtype, layout=layout, shape=shape))
    assert check_gpu_graph(fed) == []
    assert fed_types(fed, "Erase") == {"FLOAT"}


def test_check_catches_float16_into_the_gpu_erase():
    """What the erasing code did before: fn.erase straight on the float16 images."""
    fed = trace_gpu_graph(graph(lambda x: fn.erase(x, anchor=[2, 2], shape=[4, 4],
                                                   axis_names="HW"),
                                dtype=types.FLOAT16, layout="CHW", shape=(3, 24, 40)))
    errors = check_gpu_graph(fed)
    assert len(errors) == 1 and errors[0].startswith("Erase on gpu (")
    assert "input 0 is FLOAT16, the GPU kernel takes only UINT8" in errors[0]


def test_check_catches_an_operator_without_a_row_and_an_unknown_type():
    fed = trace_gpu_graph(graph(lambda x: fn.brightness(x, brightness=1.5)))
    assert check_gpu_graph(fed) == []
    table = {k: v for k, v in GPU_KERNELS.items() if k != "Brightness"}
    assert "Brightness on gpu" in check_gpu_graph(fed, table)[0]
    assert "not in GPU_KERNELS" in check_gpu_graph(fed, table)[0]
    unknown = [op.__class__(op.schema, op.device, ((None, None, "gpu"),), op.origin) for op in fed]
    assert "dtype the trace cannot tell" in check_gpu_graph(unknown)[0]


def test_tracing_leaves_dali_as_it_was():
    from nvidia.dali import ops
    from nvidia.dali.pipeline import Pipeline

    before = (ops._OperatorInstance._generate_outputs, ops._process_inputs, Pipeline.build)
    with pytest.raises(ZeroDivisionError):
        trace_gpu_graph(lambda: 1 / 0)
    assert (ops._OperatorInstance._generate_outputs, ops._process_inputs, Pipeline.build) == before
    with pytest.raises(ValueError, match="defined no DALI pipeline"):
        trace_gpu_graph(lambda: None)
