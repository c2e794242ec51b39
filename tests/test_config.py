import subprocess
import sys

import pytest

from jobs.cli import main
from jobs.config import ConfigError, config_from_dict, dump_yaml, load_config
from tests.conftest import DEMO_CONFIG, REPO


def test_defaults_are_the_reference_run():
    cfg = load_config()
    assert cfg.encode.encoder == "kl-vae" and cfg.encode.image_size == 256
    assert cfg.model.grouping == "next-neighbour"
    assert cfg.refine.optim.lr == 1e-4 and cfg.refine.optim.weight_decay == 0.05
    assert cfg.refine.optim.warmup_steps == 0 and cfg.refine.optim.betas == (0.9, 0.95)
    assert (cfg.sample.guidance.w_x, cfg.sample.guidance.w_z) == (1.25, 2.7)
    assert cfg.sample.per_class == 50


def test_stage_outputs_default_under_run_dir():
    cfg = load_config(None, ["run_dir=s3://b/run/"])
    assert cfg.latents_dir == "s3://b/run/latents"
    assert cfg.pretrain_dir == "s3://b/run/pretrain"
    assert cfg.refine_dir == "s3://b/run/refine"
    assert cfg.samples_dir == "s3://b/run/samples"
    assert cfg.eval_dir == "s3://b/run/eval"
    cfg = load_config(None, ["run_dir=/r", "sample.output=/elsewhere"])
    assert cfg.samples_dir == "/elsewhere"


def test_fixed_key_names_resolve():
    keys = ["run_dir=/x", "data.source=s3://b/imnet", "encode.encoder=wan", "encode.image_size=512",
            "pretrain.steps=7", "pretrain.checkpoint_every=3", "refine.gamma=0.5",
            "sample.output=/s", "fid.inception_weights=/w.pth"]
    cfg = load_config(None, keys)
    assert (cfg.run_dir, cfg.data.source, cfg.encode.encoder, cfg.encode.image_size) == ("/x", "s3://b/imnet", "wan", 512)
    assert (cfg.pretrain.steps, cfg.pretrain.checkpoint_every, cfg.refine.gamma) == (7, 3, 0.5)
    assert (cfg.sample.output, cfg.fid.inception_weights) == ("/s", "/w.pth")


def test_overrides_apply_after_file_and_parse_types():
    cfg = load_config(DEMO_CONFIG, ["pretrain.steps=11", "model.scales=[1,2,4]", "sample.guidance.kind=cfg",
                                     "pretrain.use_gpu=false", "data.classes=null"])
    assert cfg.pretrain.steps == 11 and cfg.model.scales == [1, 2, 4]
    assert cfg.sample.guidance.kind == "cfg" and cfg.pretrain.use_gpu is False
    assert cfg.encode.encoder == "raw"  # from the file


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("tracking.backend=wandb", "tracking.backend", '"wandb"'),
        ("pretrain.stepz=5", "pretrain.stepz", None),
        ("encode.encoder=foo", "encode.encoder", '"foo"'),
        ("pretrain.steps=-1", "pretrain.steps", "-1"),
        ("refine.gamma=abc", "refine.gamma", '"abc"'),
        ("nosuch=1", "nosuch", None),
        ("model.overrides={head_dpeth: 7}", "model.overrides", "head_dpeth"),
        ("model.preset=sar-xl", "model.preset", '"sar-xl"'),
        ("pretrain.global_batch=30", "pretrain", "not a multiple of micro_batch 32"),
        ("sample.solver=rk4", "sample.solver", '"rk4"'),
        ("sample.temperature=-0.5", "sample.temperature", "-0.5"),
        ("model.scales=var-11", "model.scales", '"var-11"'),
        # Values that must be positive or in a range: each one used to train without a word.
        ("pretrain.optim.lr=-0.001", "pretrain.optim.lr", "-0.001"),
        ("refine.optim.lr=0", "refine.optim.lr", "0"),
        ("pretrain.optim.betas=[0.9,1.0]", "pretrain.optim.betas", "[0.9, 1.0]"),
        ("pretrain.optim.betas=[-0.1,0.95]", "pretrain.optim.betas", "[-0.1, 0.95]"),
        ("pretrain.optim.weight_decay=-0.01", "pretrain.optim.weight_decay", "-0.01"),
        ("refine.ema_decay=1.0", "refine.ema_decay", "1.0"),
        ("refine.gamma=-1", "refine.gamma", "-1"),
        ("refine.cfg_scale=0.5", "refine.cfg_scale", "0.5"),
        ("sample.guidance.w_z=-1", "sample.guidance.w_z", "-1"),
        ("encode.scale_factor=0", "encode.scale_factor", "0"),
        ("encode.read_parallelism=0", "encode.read_parallelism", "0"),
        ("cluster.lease_ttl_s=0", "cluster.lease_ttl_s", "0"),
        ("cluster.lease_wait_s=-5", "cluster.lease_wait_s", "-5"),
        ("refine.rollout_groups=first", "refine.rollout_groups", '"first"'),
        ("refine.loss_reduction=max", "refine.loss_reduction", '"max"'),
        ("refine.optim.lr_scaling=sqrt", "refine.optim.lr_scaling", '"sqrt"'),
        ("refine.sample_mode=topk", "refine.sample_mode", '"topk"'),
        ("refine.init=1.5", "refine.init", "1.5"),
    ],
)
def test_bad_config_exits_2_naming_field_and_value(override, field, value, capsys):
    rc = main(["config", "show", "--config", DEMO_CONFIG, "--set", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert repr(field) in err
    if value is not None:
        assert value in err


def test_overriding_one_refine_optimizer_field_keeps_refinement_s_other_defaults():
    refine = load_config(None, ["refine.optim.grad_clip=2"]).refine.optim
    assert (refine.lr, refine.weight_decay, refine.warmup_steps, refine.grad_clip) == (1e-4, 0.05, 0, 2.0)
    assert load_config(None, ["pretrain.optim.grad_clip=2"]).pretrain.optim.lr == 8e-4


def test_the_real_reference_and_floor_are_splits_nothing_trains_on():
    with pytest.raises(ConfigError, match="not data.split 'train'"):
        load_config(DEMO_CONFIG, ["fid.domain.reference_split=train"])
    with pytest.raises(ConfigError, match="floor_split: 'val' is the reference split too"):
        load_config(DEMO_CONFIG, ["fid.domain.floor_split=val"])
    assert load_config(DEMO_CONFIG, ["fid.domain.floor_split=null"]).fid.domain.floor_split is None


def test_next_scale_needs_a_schedule():
    with pytest.raises(ConfigError, match="model.scales"):
        load_config(None, ["model.grouping=next-scale"])
    cfg = load_config(None, ["model.grouping=next-scale", "model.scales=var-10"])
    assert cfg.model.scales == "var-10"


def test_sampler_defaults_keep_euler_at_temperature_one():
    s = load_config(None).sample
    assert (s.solver, s.temperature, s.compile_head) == ("euler", 1.0, False)
    s = load_config(None, ["sample.solver=heun", "sample.temperature=0.9", "sample.compile_head=true"]).sample
    assert (s.solver, s.temperature, s.compile_head) == ("heun", 0.9, True)


def test_bad_yaml_file_is_named_with_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: runs/x\npretrain:\n  steps: 10\n    log_every: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:4:14: not valid YAML \(mapping values are not allowed here\)"):
        load_config(bad)
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:1: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_public_dict_redacts_storage_options():
    cfg = load_config(None, ["data.storage_options={key: AKIA123, secret: hunter2}"])
    dumped = str(cfg.public_dict())
    assert "hunter2" not in dumped and "AKIA123" not in dumped
    assert cfg.data.storage_options["secret"] == "hunter2"
    cfg = load_config(None, ["tracking.uri=https://alice:s3cret@mlflow.example.com:5000"])
    assert cfg.public_dict()["tracking"]["uri"] == "https://mlflow.example.com:5000"
    assert "s3cret" not in dump_yaml(cfg) and cfg.tracking.uri.startswith("https://alice:s3cret@")


@pytest.mark.parametrize("name", ["demo", "imagenet256-sar-b-klvae", "imagenet256-sar-l-klvae",
                                  "imagenet256-sar-h-klvae", "imagenet256-sar-b-raw", "imagenet256-sar-b-wan"])
def test_shipped_configs_keep_every_value_they_set(name):
    """Each value a shipped config writes is the value the loaded config holds (no validator, alias or
    default silently replaces one), and the config survives `sar config show` and a reload unchanged."""
    import yaml

    path = f"{REPO}/configs/{name}.yaml"
    cfg = load_config(path)

    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict) and k != "overrides":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    for key, value in leaves(yaml.safe_load(open(path))):
        held = cfg._get(key)
        if "{run_dir}" in str(value):
            value = value.replace("{run_dir}", cfg.run_dir)
        assert (list(held) if isinstance(held, tuple) else held) == value, key
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.ray  # a `sar` subprocess
def test_sar_console_script_config_show():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "config", "show", "--config", DEMO_CONFIG,
                          "--set", "pretrain.steps=3"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and "encoder: raw" in out.stdout
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "config", "show", "--set", "encode.encoder=x"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "encode.encoder" in out.stderr
