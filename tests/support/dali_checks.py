"""Shared checks on real DALI pipelines."""
from __future__ import annotations

import numpy as np

from pipelines.compat import shutdown_pipeline


def assert_checkpoint_resumes_exactly(pipe_fn, iterations: int = 3) -> None:
    """Run one iteration, checkpoint, run `iterations` more; a pipeline rebuilt from the
    checkpoint must give the very same outputs (output 0), bitwise."""
    first = pipe_fn()
    first.build()
    first.run()
    checkpoint = first.checkpoint()
    expected = [np.array(t) for _ in range(iterations) for t in first.run()[0]]
    resumed = pipe_fn(checkpoint=checkpoint)
    resumed.build()
    got = [np.array(t) for _ in range(iterations) for t in resumed.run()[0]]
    assert len(got) == len(expected) > 0
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    for p in (first, resumed):
        shutdown_pipeline(p)
