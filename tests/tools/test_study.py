"""tools.study: the data split (fake IDX files), the exact train command of every named study's
arms (resolved by the train CLI), skip / resume / failure / lock handling of the runner
(subprocesses faked), aggregation against numpy and tools.stats, and the aggregate-only CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jpeg_factory as jf
import numpy as np
import pytest

from tools import study
from train.__main__ import resolve
from train.config import RENAMED_KEYS


@pytest.fixture
def raw(tmp_path) -> Path:
    """Fake Fashion-MNIST: 10 train / 5 test images per class."""
    return jf.fake_fashion_mnist(tmp_path / "raw", train_per_class=10, test_per_class=5)


def _read(path: Path) -> list[tuple[str, int]]:
    return [(ln.rsplit(maxsplit=1)[0], int(ln.rsplit(maxsplit=1)[1]))
            for ln in path.read_text().splitlines()]


def test_study_data_split(raw, tmp_path):
    data = study.prepare_study_data(tmp_path / "work", train_per_class=4,
                                    cache_dir=str(tmp_path / "cache"), raw_dir=str(raw),
                                    tree_sizes=(100, 50), log=lambda *a: None)
    train, val, mon, ood = (_read(data[k]) for k in ("train", "val", "monitor", "ood"))
    assert np.bincount([y for _, y in train]).tolist() == [4] * 8
    assert np.bincount([y for _, y in val]).tolist() == [5] * 8
    assert mon == val  # 5 per class < MONITOR_PER_CLASS: all of val
    assert sorted({y for _, y in ood}) == [8, 9] and len(ood) == 10
    assert all(Path(f).is_file() and Path(f).is_absolute() for f, _ in train + val + ood)
    assert all("/train/" in f for f, _ in train) and all("/val/" in f for f, _ in val + ood)
    assert all(Path(f).parent.name.startswith(("08_", "09_")) for f, _ in ood)
    with pytest.raises(ValueError, match=r"--train-per-class must be in \[1, 10\], got 11"):
        study.prepare_study_data(tmp_path / "work", train_per_class=11,
                                 cache_dir=str(tmp_path / "cache"), raw_dir=str(raw),
                                 tree_sizes=(100, 50))


def test_train_command_is_a_valid_train_cli_call(tmp_path):
    data = {k: tmp_path / f"{k}.txt" for k in ("train", "val", "monitor", "ood")}
    for p in data.values():
        p.write_text("x.jpg 0\n")
    recipe = study.write_recipe(tmp_path / "work")
    cmd = study.train_command("transmix", 2, tmp_path / "run", data, epochs=5, recipe=recipe)
    assert cmd[1:5] == ["-m", "train", "--config", str(recipe)]
    cfg, args, _ = resolve(cmd[3:])
    assert args.output == str(tmp_path / "run")
    assert (cfg.mix.method, cfg.run.seed, cfg.run.epochs) == ("transmix", 2, 5)
    assert cfg.model.num_classes == study.ID_CLASSES == 8
    assert cfg.data.train == str(data["train"]) and cfg.data.val == str(data["monitor"])
    assert cfg.data.batch_size == 64 and cfg.data.demo is False
    # the recipe is pinned: every field of STUDY_RECIPE reaches the resolved config as given
    full = cfg.to_dict()
    for section, fields in study.STUDY_RECIPE.items():
        for k, v in fields.items():
            if k not in ("method",) and not (section, k) == ("run", "epochs"):
                got = full[section][RENAMED_KEYS.get(section, {}).get(k, k)]  # mix.preset
                assert (list(got) if isinstance(got, tuple) else got) == v, (section, k)
    # everything but the method is identical for every method
    other = study.train_command("none", 2, tmp_path / "run", data, epochs=5, recipe=recipe)
    a, b = resolve(cmd[3:])[0].to_dict(), resolve(other[3:])[0].to_dict()
    a["mix"].pop("method"), b["mix"].pop("method")
    assert a == b


# what train/summary.py writes (CRLF, epoch from 0, top-1 in %)
SUMMARY_CSV = ("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\r\n"
               "0,1.9189914,1.7940460,28.4,86.7,0.0018\r\n"
               "1,1.7368870,1.4140495,49.0,93.0,0.0013\r\n")


class FakeRunner:
    """Stands in for the subprocesses: records commands, writes what the real ones write. The
    logs get lines that look like metrics but are not the run's: the runner must not read them."""

    def __init__(self, rc: int = 0, eval_json: bool = True):
        self.rc, self.calls, self.eval_json = rc, [], eval_json

    def __call__(self, cmd, log_file, threads):
        self.calls.append(cmd)
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if "train.evaluate" in cmd:
            log_file.write_text("| top-1 | 99.99 |\n")
            if self.eval_json:
                target = Path(cmd[cmd.index("--json") + 1])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps({"top1": 0.8125, "top5": 1.0}))
        else:
            log_file.write_text("epoch 1/1: train loss 9.0 val loss 9.0 top-1 99.99\n")
            (log_file.parent / "summary.csv").write_text(SUMMARY_CSV, newline="")
            for f in ("config.yaml", "last.pth"):
                (log_file.parent / f).write_text(f)
        return self.rc


@pytest.fixture
def dirs(tmp_path):
    data = {k: tmp_path / f"{k}.txt" for k in ("train", "val", "monitor", "ood")}
    return tmp_path / "work", tmp_path / "out", data


def test_runner_trains_then_skips(monkeypatch, dirs, capsys):
    work, out, data = dirs
    fake = FakeRunner()
    monkeypatch.setattr(study, "_run_logged", fake)
    assert study.train_run("mixpro", 0, work, out, data, 5, 1, work / "r.yaml")
    assert fake.calls[0] == study.train_command("mixpro", 0, work / "runs" / "mixpro-s0", data,
                                                5, work / "r.yaml")
    kept = out / "runs" / "mixpro-s0"
    assert (kept / "summary.csv").read_bytes() == SUMMARY_CSV.encode()
    # progress comes from summary.csv, one line per finished epoch; train.log is not read
    said = capsys.readouterr().out
    assert "mixpro-s0 epoch 1/5: train loss 1.9190 val loss 1.7940 top-1 28.40" in said
    assert "mixpro-s0 epoch 2/5: train loss 1.7369 val loss 1.4140 top-1 49.00" in said
    assert "99.99" not in said and "train loss 9.0" not in said
    assert (kept / "command.txt").read_text().startswith("-m train --config ")
    assert json.loads((work / "runs" / "mixpro-s0" / "done.json").read_text())["command"] \
        == fake.calls[0]
    assert study.train_run("mixpro", 0, work, out, data, 5, 1, work / "r.yaml")
    assert len(fake.calls) == 1  # finished: skipped
    assert study.evaluate_run("mixpro-s0", work, out, data, 400, 1)
    ev_cmd = fake.calls[1]
    assert ev_cmd[1:4] == ["-m", "train.evaluate", str(work / "runs" / "mixpro-s0" / "last.pth")]
    assert ev_cmd[ev_cmd.index("--occlusion-samples") + 1] == "400"
    assert ev_cmd[ev_cmd.index("--ood") + 1] == str(data["ood"])
    said = capsys.readouterr().out
    assert "mixpro-s0 eval.json: top-1 81.25" in said and "99.99" not in said  # from the JSON
    assert study.evaluate_run("mixpro-s0", work, out, data, 400, 1)
    assert len(fake.calls) == 2  # evaluated: skipped


def test_epoch_lines_read_summary_csv(tmp_path):
    assert study.epoch_lines(tmp_path, 5) == []  # before the first epoch's end
    (tmp_path / "summary.csv").write_text(SUMMARY_CSV, newline="")
    assert study.epoch_lines(tmp_path, 2) == [
        "epoch 1/2: train loss 1.9190 val loss 1.7940 top-1 28.40",
        "epoch 2/2: train loss 1.7369 val loss 1.4140 top-1 49.00"]
    (tmp_path / "summary.csv").write_text("epoch,train_loss,lr\n0,2.5,0.1\n")  # no validation
    assert study.epoch_lines(tmp_path, 1) == ["epoch 1/1: train loss 2.5000"]


def test_evaluate_run_fails_without_its_json(monkeypatch, dirs, capsys):
    work, out, data = dirs
    monkeypatch.setattr(study, "_run_logged", FakeRunner(eval_json=False))
    assert not study.evaluate_run("none-s0", work, out, data, 400, 1)
    assert "python -m train.evaluate wrote no " in capsys.readouterr().out


def test_runner_resumes_a_killed_run_and_reports_failures(monkeypatch, dirs):
    work, out, data = dirs
    run = work / "runs" / "deit-s1"
    run.mkdir(parents=True)
    (run / "last.pth").write_text("partial")
    fake = FakeRunner(rc=1)
    monkeypatch.setattr(study, "_run_logged", fake)
    assert not study.train_run("deit", 1, work, out, data, 5, 1, work / "r.yaml")
    assert fake.calls[0][1:] == ["-m", "train", "--resume", str(run)]
    assert not (run / "done.json").exists()
    fake.rc = 0
    assert study.train_run("deit", 1, work, out, data, 5, 1, work / "r.yaml")
    assert fake.calls[1][1:] == ["-m", "train", "--resume", str(run)]
    assert (run / "done.json").is_file()


def _fake_eval(top1, ece, auroc, curve):
    bins = [{"lower": 0.0, "upper": 0.5, "count": 2, "confidence": 0.4, "accuracy": top1},
            {"lower": 0.5, "upper": 1.0, "count": 1, "confidence": 0.9, "accuracy": 1.0}]
    return {"top1": top1, "top5": 1.0, "nll": 0.5, "ece": ece, "calibration_bins": bins,
            "ood": {"auroc": auroc, "aupr_in": 0.9, "aupr_out": 0.4, "fpr95": 0.8,
                    "by_label": {"8": {"auroc": auroc + 0.1}, "9": {"auroc": auroc - 0.1}}},
            "occlusion": {"drop": "pixels", "samples": 400, "ratios": [0.0, 0.5, 0.9],
                          "accuracy": {"random": curve, "salient": [c / 2 for c in curve]}}}


def test_aggregate_against_numpy(tmp_path):
    out = tmp_path / "out"
    vals = {"none": [(0.70, 0.05, 0.6, [0.7, 0.5, 0.2]), (0.72, 0.03, 0.7, [0.72, 0.4, 0.1]),
                     (0.68, 0.04, 0.5, [0.68, 0.45, 0.3])],
            "mixpro": [(0.65, 0.10, 0.55, [0.65, 0.6, 0.3])]}
    for m, rows in vals.items():
        for s, r in enumerate(rows):
            p = out / "runs" / f"{m}-s{s}" / "eval.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps(_fake_eval(*r)))
    summary = study.aggregate(out, methods=["none", "deit", "mixpro"], seeds=[0, 1, 2])
    assert list(summary) == ["none", "mixpro"]  # deit has no evaluated run
    top1 = [r[0] for r in vals["none"]]
    assert summary["none"]["top1"]["mean"] == pytest.approx(np.mean(top1))
    assert summary["none"]["top1"]["std"] == pytest.approx(np.std(top1, ddof=1))
    assert summary["none"]["auroc"]["values"] == [0.6, 0.7, 0.5]
    assert summary["none"]["auroc_8"]["mean"] == pytest.approx(0.7)
    assert summary["none"]["auroc_9"]["values"] == pytest.approx([0.5, 0.6, 0.4])
    curves = np.array([r[3] for r in vals["none"]])
    occ = summary["none"]["occlusion"]
    assert occ["random"]["mean"] == pytest.approx(curves.mean(0).tolist())
    assert occ["random"]["std"] == pytest.approx(curves.std(0, ddof=1).tolist())
    assert occ["random"]["mean_occ"]["mean"] == pytest.approx(curves[:, 1:].mean())
    assert occ["salient"]["mean_occ"]["mean"] == pytest.approx(curves[:, 1:].mean() / 2)
    assert summary["mixpro"]["seeds"] == [0] and math.isnan(summary["mixpro"]["ece"]["std"])
    table = (out / "summary.md").read_text()
    assert table == study.summary_table(summary)
    assert "| none | 3 | 70.00 ± 2.00 |" in table
    assert "| mixpro | 1 | 65.00 | 100.00 | 0.500 | 10.00 |" in table
    assert "| AUROC bag only | AUROC ankle boot only |" in table
    assert json.loads((out / "summary.json").read_text())["none"]["seeds"] == [0, 1, 2]
    assert (out / "occlusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    pooled = summary["none"]["calibration_bins"]
    assert pooled[0]["count"] == 6 and pooled[0]["accuracy"] == pytest.approx(np.mean(top1))
    assert pooled[1] == {"lower": 0.5, "upper": 1.0, "count": 3, "confidence": 0.9,
                         "accuracy": 1.0}


def test_aggregate_only_cli(tmp_path, capsys):
    out = tmp_path / "out"
    p = out / "runs" / "none-s0" / "eval.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(_fake_eval(0.7, 0.05, 0.6, [0.7, 0.5, 0.2])))
    assert study.main(["--out", str(out), "--work", str(tmp_path / "w"), "--stages",
                       "aggregate"]) == 0
    assert "| none | 1 | 70.00 |" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()  # no data preparation for aggregate only


@pytest.mark.parametrize("name", sorted(study.STUDIES))
def test_every_named_study_resolves_and_differs_only_by_its_arm(name, tmp_path):
    st = study.STUDIES[name]
    data = {k: tmp_path / f"{k}.txt" for k in ("train", "val", "monitor", "ood")}
    recipe = study.write_recipe(tmp_path / "work", st.recipe_dict())
    resolved = {}
    for arm, over in st.arms.items():
        extra = {k: v for k, v in over.items() if k not in ("mix.method", "train_per_class")}
        cmd = study.train_command(over["mix.method"], 3, tmp_path / arm, data, st.epochs, recipe,
                                  extra)
        cfg = resolve(cmd[3:])[0]
        assert (cfg.mix.method, cfg.run.seed) == (over["mix.method"], 3)
        assert cfg.run.epochs == over.get("run.epochs", st.epochs)
        assert cfg.model.num_classes == study.ID_CLASSES
        assert cfg.data.image_size == st.image_size and cfg.data.demo is False
        if "mix.mask_patch" in over:
            assert cfg.mix.mask_patch == over["mix.mask_patch"]
        d = cfg.to_dict()
        d["mix"].pop("method"), d["run"].pop("epochs"), d["mix"].pop("mask_patch")
        resolved[arm] = d
    first = next(iter(resolved.values()))
    assert all(d == first for d in resolved.values())  # one recipe, one budget
    assert st.reference is None or st.reference in st.arms


def test_overfit_study_uses_the_16_token_model_and_pinned_recipe():
    st = study.STUDIES["overfit"]
    r = st.recipe_dict()
    k = r["model"]["kwargs"]
    assert (k["img_size"] // k["patch_size"]) ** 2 == 16 and r["mix"]["mask_patch"] == 7
    assert list(st.arms) == list(study.METHODS) and len(st.seeds) >= 5
    assert st.reference == "mixpro" and study.STUDIES["overfit_pilot"].train_accuracy


def test_study_definition_errors():
    with pytest.raises(ValueError, match="arm 'x': mix.method must be one of"):
        study.Study("bad", {}, {"x": {"mix.method": "cutout"}}, (0,), 1, 1)
    with pytest.raises(ValueError, match="reference 'deit' is not an arm"):
        study.Study("bad", {}, {"none": {"mix.method": "none"}}, (0,), 1, 1, reference="deit")
    with pytest.raises(ValueError, match=r"--arms \['mixpro'\] not in study 'overfit_cells'"):
        study.main(["--study", "overfit_cells", "--arms", "mixpro", "--stages", "aggregate"])


def test_train_run_with_an_arm_name_and_extra_overrides(monkeypatch, dirs, capsys):
    work, out, data = dirs
    fake = FakeRunner()
    monkeypatch.setattr(study, "_run_logged", fake)
    assert study.train_run("maskmix", 2, work, out, data, 40, 1, work / "r.yaml",
                           arm="maskmix-c14", extra={"mix.mask_patch": 14, "run.epochs": 7})
    cmd = fake.calls[0]
    assert cmd[cmd.index("--output") + 1] == str(work / "runs" / "maskmix-c14-s2")
    assert cmd[cmd.index("--mix.mask_patch") + 1] == "14"
    assert cmd.count("--run.epochs") == 1 and cmd[cmd.index("--run.epochs") + 1] == "7"
    assert "maskmix-c14-s2 epoch 2/7: train loss" in capsys.readouterr().out  # the arm's budget
    assert (out / "runs" / "maskmix-c14-s2" / "command.txt").is_file()


def test_evaluate_run_also_on_the_training_list(monkeypatch, dirs):
    work, out, data = dirs
    fake = FakeRunner()
    monkeypatch.setattr(study, "_run_logged", fake)
    assert study.evaluate_run("none-s0", work, out, data, 400, 1, train_accuracy=True)
    assert len(fake.calls) == 2
    tr = fake.calls[1]
    assert tr[tr.index("--data") + 1] == str(data["train"]) and "--ood" not in tr
    assert tr[tr.index("--modes") + 1] == "--json"  # no occlusion modes
    assert tr[tr.index("--json") + 1] == str(out / "runs" / "none-s0" / "train_eval.json")
    assert study.evaluate_run("none-s0", work, out, data, 400, 1, train_accuracy=True)
    assert len(fake.calls) == 2


def test_a_locked_run_is_skipped(monkeypatch, dirs, capsys):
    work, out, data = dirs
    fake = FakeRunner()
    monkeypatch.setattr(study, "_run_logged", fake)
    args = study._parser().parse_args([])
    with study.run_lock(work, "deit-s0") as mine:
        assert mine
        with study.run_lock(work, "deit-s0") as again:
            assert not again  # a second holder (another runner) is refused
        study._one_run("deit", {"mix.method": "deit"}, 0, work, out, data, 5, args,
                       work / "r.yaml", 400, False)
        assert fake.calls == [] and "another runner holds" in capsys.readouterr().out
    study._one_run("deit", {"mix.method": "deit"}, 0, work, out, data, 5, args,
                   work / "r.yaml", 400, False)
    assert [c[2] for c in fake.calls] == ["train", "train.evaluate"]  # released: it runs


def _write_run(out, arm, seed, top1, alpha=None):
    d = out / "runs" / f"{arm}-s{seed}"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps(_fake_eval(top1, 0.05, 0.6, [top1, 0.5, 0.2])))
    (d / "train_eval.json").write_text(json.dumps({"top1": 0.99 - seed / 100}))
    cols = "epoch,train_loss,eval_loss,eval_top1,lr,train_pal_alpha_mean,train_pal_lam_attn"
    rows = [f"{e},{1 - e / 10},{0.8 + e / 20},{top1},0.001,"
            + (f"{alpha * e},0.5" if alpha else "nan,nan") for e in range(3)]
    (d / "summary.csv").write_text("\n".join([cols, *rows]) + "\n")


def test_aggregate_welch_tests_ci_and_curves(tmp_path):
    from tools import stats
    out = tmp_path / "out"
    top1 = {"mixpro": [0.71, 0.74, 0.70, 0.73, 0.72], "none": [0.66, 0.69, 0.70, 0.65, 0.68],
            "deit": [0.72, 0.70, 0.74, 0.71, 0.73]}
    for arm, vals in top1.items():
        for s, v in enumerate(vals):
            _write_run(out, arm, s, v, alpha=0.1 if arm == "mixpro" else None)
    summary = study.aggregate(out, methods=["none", "deit", "mixpro"], seeds=range(5),
                              reference="mixpro")
    assert summary["none"]["top1"]["ci95"] == pytest.approx(list(stats.mean_ci(top1["none"])))
    assert summary["none"]["train_top1"]["mean"] == pytest.approx(0.97)
    saved = json.loads((out / "summary.json").read_text())
    t = saved["_tests"]["top1"]
    assert list(t) == ["none", "deit"]
    ps = [stats.welch(top1["mixpro"], top1[a])["p"] for a in ("none", "deit")]
    assert [t[a]["p"] for a in ("none", "deit")] == pytest.approx(ps)
    assert [t[a]["p_holm"] for a in ("none", "deit")] == pytest.approx(stats.holm(ps))
    assert t["none"]["diff"] == pytest.approx(np.mean(top1["mixpro"]) - np.mean(top1["none"]))
    assert set(saved["_tests"]) == {"top1", "nll", "ece", "auroc", "occl_random"}
    md = (out / "summary.md").read_text()
    assert "| top1 | none | +4.40 |" in md and "95% CI (t, n-1 df)" in md
    curves = summary["mixpro"]["curves"]
    assert curves["eval_loss"]["mean"] == pytest.approx([0.8, 0.85, 0.9])
    assert curves["train_pal_alpha_mean"]["mean"] == pytest.approx([0.0, 0.1, 0.2])
    assert np.isnan(summary["none"]["curves"]["train_pal_alpha_mean"]["mean"]).all()
    for png in ("curves.png", "alpha.png", "occlusion.png", "reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
