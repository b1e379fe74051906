"""tools.gpu_check: the steps that run without a GPU (operator vs kernel, augment, loader,
checkpoint), the whole script at tiny sizes on the CPU, a hanging step cut off by its timeout
with a stack dump while later steps still run, and that the comparisons catch a wrong output."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tools import gpu_check
from tools import gpu_check_steps as steps


def test_operator_check_cpu_backend_matches_kernel():
    res = steps.check_operator("cpu", batches=2)
    assert res["ok"], res["errors"]
    assert res["cases"] == 5 * 2 * 2 and res["backends"] == ["cpu"]


def test_compare_catches_wrong_pixels_and_decisions():
    want = [np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 1)), np.zeros((2, 1)),
            np.full(2, 0.5, np.float32), np.ones((2, 2, 2), np.uint8), np.full(2, 3, np.int32)]
    got = [w.copy() for w in want]
    assert steps._compare(got, want, False, "x") == []
    got[0][0, 0, 0, 0] = 1
    got[3][1] = 0.25
    errs = steps._compare(got, want, False, "x")
    assert any("image: 1 of 96" in e for e in errs) and any("lam" in e for e in errs)
    assert steps._compare(got[:1] + want[1:], want, True, "x") == []     # mixup: 1 level ok


def test_augment_check_compares_kernel_sets_and_catches_a_difference(monkeypatch):
    res = steps.check_augment("cpu", batches=1)
    assert res["ok"] and res["changed_samples"]["rand_augment"] > 0, res
    import pipelines.randaugment as ra    # a kernel set that drew other decisions must fail
    real = ra.rand_augment
    monkeypatch.setattr(ra, "rand_augment", lambda x, policy, seed, kernels, **kw: real(
        x, policy, seed=seed + (kernels == "dali"), kernels=kernels, **kw))
    bad = steps.check_augment("cpu", batches=1)
    assert not bad["ok"] and "rand_augment batch 0" in bad["errors"][0]


def test_poison_check_skips_without_gpu():
    assert steps.check_poison("cpu") == {"ok": True, "skipped": "no GPU"}


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    steps.shutdown_pipelines()


def test_augment_check_catches_a_wrong_per_channel_fill(monkeypatch):
    real = steps._augment_cases

    def cases(quick):
        out = real(quick)
        name = "warp_fill"
        images, layout, make, kernels, tol = out[name]
        import pipelines.randaugment as ra
        from pipelines.randaugment import RandAugmentPolicy

        policy = RandAugmentPolicy(magnitude=9.0, num_layers=1, prob=1.0, magnitude_std=0.5,
                                   transforms=("Rotate", "TranslateXRel"))
        fills = {"pillow": (124, 116, 104), "dali": (124, 124, 124)}
        return {name: (images, layout, lambda k: (lambda x: ra.rand_augment(
            x, policy, seed=5, kernels=k, fill=fills[k])), kernels, tol)}

    monkeypatch.setattr(steps, "_augment_cases", cases)
    bad = steps.check_augment("cpu", batches=1)
    assert not bad["ok"] and "warp_fill batch 0" in bad["errors"][0], bad


def test_a_hanging_step_is_cut_off_with_a_stack_dump_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--only",
                         "selftest_hang,versions,selftest_fail", "--data", str(tmp_path),
                         "--work", str(tmp_path / "work")])
    report = json.loads((out / "gpu_check.json").read_text())
    hang = report["steps"]["selftest_hang"]
    assert rc == 1 and not report["ok"] and hang["timeout"] and not hang["ok"]
    assert "Thread" in hang["log_tail"] and "run_step" in hang["log_tail"]   # faulthandler
    assert report["steps"]["versions"]["ok"] and report["steps"]["versions"]["torch"]
    assert "log_tail" not in report["steps"]["versions"]      # the tail only for a failure
    fail = report["steps"]["selftest_fail"]                   # failed, with its JSON written
    assert fail["ok"] is False and "selftest_fail: why it failed" in fail["log_tail"]
    log = (out / "gpu_check.log").read_text()
    assert "===== selftest_hang" in log and "===== versions" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    assert report["seconds"] < 60


def test_steps_that_no_longer_fit_are_skipped_and_recorded(tmp_path):
    # 25 s minus the 5 s reserve leaves >= the 10 s that versions needs when it starts, and
    # < the 20 s that operator needs once versions has taken any time at all: on any machine
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--only",
                         "versions,operator", "--time-limit", "25", "--data", str(tmp_path),
                         "--work", str(tmp_path / "work")])
    report = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and report["steps"]["versions"]["ok"]
    assert "out of time" in report["steps"]["operator"]["skipped"]
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--device", "cpu", "--out", str(out), "--only", "nope"])


BENCH = """import argparse, json, sys
from pathlib import Path
p = argparse.ArgumentParser(); p.add_argument("--out"); p.add_argument("--time-limit")
p.add_argument("--rc", type=int, default=0); a = p.parse_args()
print('{"results": "from stdout"}'); print("stderr noise", file=sys.stderr)
if a.rc == 0:
    (Path(a.out) / "fake.json").write_text(json.dumps({"results": [{"img_s": 123.0}]}))
sys.exit(a.rc)
"""


def test_bench_results_come_from_the_out_json_not_from_stdout(tmp_path, monkeypatch, capfd):
    (tmp_path / "fake_bench_cli.py").write_text(BENCH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    a = gpu_check.parse_args(["--work", str(tmp_path)])
    a.work, a.step_timeout = tmp_path, 60
    res = gpu_check._bench(a, ["fake_bench_cli"], "fake")
    assert res == {"ok": True, "rc": 0, "results": [{"img_s": 123.0}]}
    assert '"from stdout"' in capfd.readouterr().out      # its output passes through, unread
    (tmp_path / "fake.json").unlink()
    res = gpu_check._bench(a, ["fake_bench_cli", "--rc", "3"], "fake")
    assert res["ok"] is False and res["rc"] == 3 and "results" not in res
    assert res["error"].startswith("python -m fake_bench_cli (exit status 3) wrote no ")


@pytest.mark.slow
def test_gpu_check_script_on_cpu(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--time-limit", "1500",
                         "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work")])
    report = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and report["ok"], {k: v for k, v in report["steps"].items() if not v.get("ok")}
    assert list(report["steps"]) == list(gpu_check.STEPS)
    assert all(r["ok"] for r in report["steps"].values())
    assert report["steps"]["pytest_cuda"]["skipped"] == "no GPU"
    assert report["steps"]["loader_sync"]["operator_calls"] == 3
    for bench in ("pipeline_full", "pipeline_plain", "train_bench"):   # tables travel inside
        assert report["steps"][bench]["results"], bench
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_only_and_skip_help_list_every_step(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]   # after usage
    for flag in ("--only", "--skip"):
        help_ = text.split(f"{flag} {flag[2:].upper()}", 1)[1].split(" --", 1)[0]
        listed = [s.strip(" ()") for s in re.split(r"[:(]", help_)[-1].split(",")]
        assert listed == list(gpu_check.STEPS), (flag, help_)
