"""train.config + the CLI's config resolution: presets load, overrides are type-checked, unknown and
duplicate keys are errors that name the key and list the valid ones."""
from __future__ import annotations

import pytest
import yaml

from train.__main__ import main, parse_overrides, resolve
from train.config import CONFIG_DIR, DeprecatedConfigKey, TrainConfig, apply_overrides, load_yaml

DATA = ["--data.train", "/nonexistent/train", "--data.val", "/nonexistent/val"]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_load_and_round_trip(path):
    d = load_yaml(path)
    if not d.get("data", {}).get("demo"):
        d = apply_overrides(d, {"data.train": "/x", "data.val": "/y"})
    cfg = TrainConfig.from_dict(d)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    yaml.safe_dump(cfg.to_dict())  # plain builtins only


def test_default_is_the_demo():
    cfg, args, name = resolve([])
    assert name == "demo_fashion_mnist" and cfg.data.use_demo
    assert cfg.model.num_classes == 10 and cfg.mix.method == "mixpro"


def test_mixpro_deit_tiny_is_the_documented_recipe():
    """train/configs/mixpro_deit_tiny.yaml holds the recipe of docs/method.md section 9."""
    cfg, _, _ = resolve(["--config", "mixpro_deit_tiny", *DATA])
    o = cfg.optim
    assert (o.opt, o.lr, o.lr_base_batch, o.weight_decay, o.eps) == ("adamw", 1e-3, 1024, 0.05,
                                                                        1e-8)
    assert (o.warmup_epochs, o.warmup_lr, o.min_lr, cfg.run.epochs) == (20, 1e-6, 1e-5, 300)
    assert (cfg.mix.smoothing, cfg.model.drop_path, cfg.data.re_prob) == (0.1, 0.1, 0.25)
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and not cfg.run.ema


def test_overrides_are_typed():
    cfg, _, _ = resolve(["--optim.lr", "5e-4", "--model.kwargs.depth", "3", "--run.ema=true",
                         "--data.scale", "[0.5, 1]", "--optim.clip_grad", "null"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.kwargs["depth"] == 3 and cfg.model.kwargs["patch_size"] == 7
    assert cfg.run.ema is True and cfg.data.scale == (0.5, 1.0) and cfg.optim.clip_grad is None


@pytest.mark.parametrize("argv, match", [
    (["--optim.lrr", "1"], r"unknown key in section 'optim' 'lrr' \(did you mean 'lr'\?\); "
                           r"valid: opt, lr,"),
    (["--optimizer.lr", "1"], r"unknown config section 'optimizer' \(did you mean 'optim'\?\)"),
    (["--run.epochs", "ten"], r"run.epochs must be an int, got 'ten'"),
    (["--run.ema", "1"], r"run.ema must be true or false"),
    (["--run.epochs", "0"], r"run.epochs must be an int >= 1, got 0"),
    (["--mix.method", "cutout"], r"mix.method must be one of \('none', 'deit'"),
    (["--mix.method", "deit", "--mix.label_variant", "official"],
     r"mix.label_variant='official' applies to mix.method='mixpro' only"),
    (["--mix.label_variant", "best"], r"mix.label_variant must be 'paper' or 'official'"),
    (["--data.scale", "[0.5]"], r"data.scale must be a list of 2 values"),
    (["--lr", "1"], r"overrides look like --section.key value"),
    (["--optim.lr", "1", "--optim.lr", "2"], r"given twice"),
    (["--config", "nope"], r"no such file and no packaged config.*mixpro_deit_tiny"),
    (["--config", "mixpro_deit_tiny"], r"no dataset: set --data.train DIR --data.val DIR"),
    (["--data.train", "/x"], r"data.val is missing"),
    (["--model.kwargs", "{num_classes: 3}"], r"model.kwargs must be free of \['num_classes'\]"),
])
def test_bad_config_errors(argv, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        resolve(argv)


def test_unknown_and_hyphenated_yaml_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {demo: true}\nmix:\n  mask-patch: 8\n")
    with pytest.raises(ValueError, match=r"'mask-patch' \(did you mean 'mask_patch'\?\)"):
        resolve(["--config", str(p)])
    p.write_text("data: {demo: true}\nrun:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ValueError, match=r"duplicate key 'epochs' in config \(line 4\)"):
        resolve(["--config", str(p)])
    p.write_text("data: {demo: true}\nrun: 3\n")
    with pytest.raises(TypeError, match=r"section 'run' must be a mapping"):
        resolve(["--config", str(p)])


def test_cli_exit_code_and_message(capsys):
    assert main(["--optim.lrr", "1"]) == 2
    err = capsys.readouterr().err
    assert "python -m train: error: unknown key in section 'optim' 'lrr'" in err


def test_print_config(capsys):
    assert main(["--print-config", "--run.epochs", "7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["epochs"] == 7


def test_parse_overrides_values():
    assert parse_overrides(["--a.b", "1", "--c.d=x y", "--e.f", "null"]) == {
        "a.b": 1, "c.d": "x y", "e.f": None}


def test_yaml_1_1_bool_words_stay_strings(tmp_path):
    """`--run.progress off` is the documented choice 'off', not YAML 1.1's False."""
    cfg, _, _ = resolve(["--run.progress", "off", "--run.tensorboard", "false"])
    assert cfg.run.progress == "off" and cfg.run.tensorboard is False
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  progress: off\n")
    assert load_yaml(f) == {"run": {"progress": "off"}}
    with pytest.raises(TypeError, match="run.tensorboard must be true or false, got 'yes'"):
        resolve(["--run.tensorboard", "yes"])


def test_resume_takes_the_checkpoint_config_and_folder(tmp_path):
    import torch
    from train.checkpoint import FORMAT_VERSION, seal
    cfg, _, _ = resolve(["--run.epochs", "3"])
    stub = {"version": FORMAT_VERSION, "model": {}, "optimizer": {}, "scheduler": {},
            "state": {}, "ranks": [{"rng": {}, "loader": {}, "running": {}}],
            "config": cfg.to_dict()}
    torch.save(seal(stub), tmp_path / "last.pth")
    again, args, name = resolve(["--resume", str(tmp_path), "--run.epochs", "5"])
    assert args.output == str(tmp_path) and name == "resumed"
    assert again.run.epochs == 5 and again.model == cfg.model and again.data == cfg.data


# mix.preset -> mix.label_variant: the old key is a deprecated alias in YAML, CLI and checkpoints
def test_mix_preset_is_a_deprecated_alias_of_label_variant(tmp_path):
    new, _, _ = resolve(["--mix.label_variant", "official"])
    assert new.mix.label_variant == "official" and "preset" not in new.to_dict()["mix"]
    with pytest.warns(DeprecatedConfigKey, match=r"mix.preset is deprecated: use mix.label_vari"):
        old, _, _ = resolve(["--mix.preset", "official"])
    assert old == new
    p = tmp_path / "c.yaml"
    p.write_text("data: {demo: true}\nmix: {method: mixpro, preset: official}\n")
    with pytest.warns(DeprecatedConfigKey, match=r"mix.preset is deprecated"):
        from_yaml, _, _ = resolve(["--config", str(p)])
    p.with_name("n.yaml").write_text("data: {demo: true}\nmix: {method: mixpro, "
                                     "label_variant: official}\n")
    assert from_yaml == resolve(["--config", str(p.with_name("n.yaml"))])[0]
    assert from_yaml.mix.label_variant == "official"
    # the CLI's new key replaces the YAML's old one (no conflict, no warning), and the CLI's old
    # key the YAML's new one (the demo config has label_variant: paper)
    assert resolve(["--config", str(p), "--mix.label_variant", "paper"])[0].mix.label_variant \
        == "paper"
    with pytest.warns(DeprecatedConfigKey):
        assert resolve(["--mix.preset", "official"])[0].mix.label_variant == "official"
    with pytest.warns(DeprecatedConfigKey):  # both names, one value: fine
        same, _, _ = resolve(["--mix.preset", "official", "--mix.label_variant", "official"])
    assert same == new


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_mix_preset_and_label_variant_disagreeing_is_an_error(tmp_path, where):
    argv = ["--mix.preset", "official", "--mix.label_variant", "paper"]
    if where == "yaml":
        p = tmp_path / "c.yaml"
        p.write_text("data: {demo: true}\nmix: {preset: official, label_variant: paper}\n")
        argv = ["--config", str(p)]
    with pytest.warns(DeprecatedConfigKey), pytest.raises(
            ValueError, match=r"mix.preset='official' and mix.label_variant='paper' disagree: "
                              r"mix.preset is the deprecated name of mix.label_variant"):
        resolve(argv)


def test_resume_from_a_checkpoint_written_with_mix_preset(tmp_path):
    """Checkpoints store the resolved config as a dict: one written before the rename has
    mix.preset, and resuming from it must give the same run."""
    import torch
    from train.checkpoint import FORMAT_VERSION, seal
    cfg, _, _ = resolve(["--mix.label_variant", "official"])
    old = cfg.to_dict()
    old["mix"] = {("preset" if k == "label_variant" else k): v for k, v in old["mix"].items()}
    stub = {"version": FORMAT_VERSION, "model": {}, "optimizer": {}, "scheduler": {},
            "state": {}, "ranks": [{"rng": {}, "loader": {}, "running": {}}], "config": old}
    torch.save(seal(stub), tmp_path / "last.pth")
    with pytest.warns(DeprecatedConfigKey, match=r"mix.preset is deprecated"):
        again, _, name = resolve(["--resume", str(tmp_path)])
    assert name == "resumed" and again == cfg
    # a new-key override replaces the old key of the checkpoint: no conflict, no warning
    paper, _, _ = resolve(["--resume", str(tmp_path), "--mix.label_variant", "paper"])
    assert paper.mix.label_variant == "paper"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # new checkpoints: no warning needed
