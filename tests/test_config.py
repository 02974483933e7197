"""Configuration: defaults are the paper's, YAML + overrides, validation names the field and the
value, the merged result (not the file alone) is validated, round trip through saved YAML."""

import dataclasses
import typing

import pytest
import yaml

from carft_mega.config import (TrainerConfig, apply_overrides, format_config, from_dict, load_config,
                               save_config, to_dict)


def test_defaults_are_the_papers():
    c = TrainerConfig()
    assert (c.sft.lr, c.ppo.lr, c.ppo.rollout_batch_size, c.ppo.ppo_epochs) == (1e-5, 3e-7, 64, 2)
    assert (c.ppo.clip_eps, c.ppo.value_clip, c.ppo.vf_coef, c.ppo.kl_coef) == (0.2, 0.2, 5.0, 0.05)
    assert (c.ppo.gamma, c.ppo.lam, c.ppo.resolved_whitening(), c.ppo.whiten_add_mean_back) == \
        (1.0, 0.95, "global", False)  # ReFT's gamma 1, lambda 0.95 and centred global whitening
    assert (c.ppo.estimator, c.ppo.resolved_loss_agg()) == ("gae", "token-mean")
    d = load_config(None, ["ppo.estimator=drgrpo", "rollout.samples_per_prompt=2"]).ppo
    assert (d.resolved_whitening(), d.resolved_loss_agg()) == ("none", "seq-mean-token-sum-norm")
    assert (c.contrastive.signal, c.contrastive.coef, c.contrastive.tau) == ("positive", 1e-3, 0.2)
    assert (c.rollout.temperature, c.rollout.top_k, c.rollout.top_p, c.rollout.samples_per_prompt) == (1.0, 0, 1.0, 1)
    assert c.data.max_length == 1024 and c.reward.tolerance == 1e-2


def test_every_field_has_a_docstring():
    import inspect
    import carft_mega.config as mod
    src = inspect.getsource(mod)
    for cls in (TrainerConfig, *{typing.get_type_hints(TrainerConfig)[f.name] for f in dataclasses.fields(TrainerConfig)
                                  if dataclasses.is_dataclass(typing.get_type_hints(TrainerConfig)[f.name])}):
        body = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            after = body.split(f"    {f.name}:", 1)[1].split("\n", 2)[1]
            assert after.strip().startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"
    assert src


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ppo:\n  lr: 1e-6\n  epochs: 3\nmodel:\n  tiny: {hidden_size: 32}\n")
    c = load_config(p, ["ppo.max_steps=7", "contrastive.signal=none", "model.tiny.num_layers=3",
                        "data.eval_limit=null", "sft.lr=2e-5", "model.path=none"])
    assert (c.ppo.lr, c.ppo.epochs, c.ppo.max_steps) == (1e-6, 3.0, 7)  # '1e-6' read as a float
    assert c.contrastive.signal == "none" and c.model.tiny.hidden_size == 32 and c.model.tiny.num_layers == 3
    assert c.data.eval_limit is None and c.sft.lr == 2e-5 and c.model.path == "none"


def test_file_is_validated_after_the_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  source: hf\n")  # incomplete on its own: the launcher passes model.path
    with pytest.raises(ValueError, match="model.path"):
        load_config(p)
    assert load_config(p, ["model.path=/models/x"]).model.path == "/models/x"


@pytest.mark.parametrize("override,field", [
    ("ppo.lr=-1", "ppo.lr"), ("contrastive.signal=foo", "contrastive.signal"),
    ("sft.global_batch_size=10", "sft.global_batch_size"), ("rollout.top_p=0", "rollout.top_p"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel"), ("ppo.gamma=2", "ppo.gamma"),
    ("model.tiny.num_kv_heads=3", "model.tiny.num_kv_heads"), ("rollout.max_new_tokens=5000", "rollout.max_new_tokens"),
    ("ppo.epochs=abc", "ppo.epochs"), ("model.head_trunk_grad_scale=2", "model.head_trunk_grad_scale"),
    ("model.dtype=fp16", "model.dtype"),
])
def test_bad_values_name_field_and_value(override, field):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert f"'{field}'" in str(e.value) and override.split("=", 1)[1].lower() in str(e.value).lower()


@pytest.mark.parametrize("overrides,field,why", [
    (["rollout.top_k=20"], "rollout.top_k", "RL training"),
    (["rollout.top_p=0.9"], "rollout.top_p", "RL training"),
    (["ppo.estimator=drgrpo"], "rollout.samples_per_prompt", "drgrpo"),
    (["ppo.estimator=drgrpo", "rollout.samples_per_prompt=2", "ppo.critic_warmup_steps=3"], "ppo.critic_warmup_steps",
     "no critic"),
    (["ppo.estimator=drgrpo", "rollout.samples_per_prompt=2", "ppo.loss_agg=seq-mean-token-mean"], "ppo.loss_agg",
     "Dr.GRPO removes"),
    (["sft.enabled=false", "ppo.enabled=false"], "ppo.enabled", "nothing to do"),
    (["sft.max_nonfinite_steps=0"], "sft.max_nonfinite_steps", "> 0"),
])
def test_combinations_that_cannot_work_are_refused_at_start(overrides, field, why):
    """Refused when the config is loaded, before any stage runs (SFT would otherwise run first)."""
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert f"'{field}'" in str(e.value) and why in str(e.value)


def test_sampling_filters_are_allowed_without_rl():
    c = load_config(None, ["rollout.top_k=20", "rollout.top_p=0.9", "ppo.enabled=false"])
    assert (c.rollout.top_k, c.rollout.top_p) == (20, 0.9)


@pytest.mark.parametrize("override,msg", [("ppo.nope=1", "no field 'nope'"), ("ppo=3", "is a section"),
                                          ("novalue", "section.field=value"), ("ppo.lr.x=1", "is a field")])
def test_bad_override_syntax(override, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, [override])


def test_unknown_yaml_key_and_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ppo:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match=r"ppo\.learning_rate"):
        load_config(p)
    p.write_text("ppo: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    c = load_config(None, ["ppo.max_steps=3", "data.dataset=svamp", "rollout.top_p=0.9", "ppo.enabled=false"])
    save_config(c, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == c and to_dict(again) == yaml.safe_load(format_config(c))
    assert from_dict(TrainerConfig, to_dict(c)) == c and apply_overrides(c, []) == c


def test_shipped_configs_load():
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = glob.glob(os.path.join(root, "examples", "configs", "*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_config(f, ["model.path=/m"] if "quickstart" not in f else [])
