"""Tools around the product, apart from the data path (pipelines/) and the trainer (train/):
benchmarks (bench_pipeline, bench_train, bench_operator, bench_report), the GPU check
(gpu_check, gpu_check_steps, gpu_kernels), synthetic data (imagenet_like), the study (study,
study_report, stats), batch and PAL inspection (inspect_batch, pal_plot) and the refactoring
fingerprint. Tools may import and run everything below them; nothing in mixpro_dali/,
pipelines/ or train/ imports or runs a tool (tests/test_layering.py checks both).
"""
