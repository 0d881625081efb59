import pytest

from dcube.config import ConfigError, RunConfig, from_dict, load_config


def test_defaults_are_the_demo():
    cfg = from_dict({})
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "pneumoniamnist" and cfg.data.image_size == 28
    assert cfg.features.max_layers == 4 and cfg.diffusion.ema_decay == 0.999


@pytest.mark.parametrize("values, field", [
    ({"classifier": {"epochz": 3}}, "classifier.epochz"),
    ({"diffusion": {"backbone": "vit"}}, "diffusion.backbone"),
    ({"diffusion": {"epochs": "ten"}}, "diffusion.epochs"),
    ({"features": {"timestep": 1000}}, "features.timestep"),
    ({"features": {"ks_alpha": 1.5}}, "features.ks_alpha: removed in dcube 1.0"),
    ({"data": {"source": "folder"}}, "data.path"),
    ({"classifier": {"cycle_weight": -1}}, "classifier.cycle_weight"),
    ({"data": {"download": "yes"}}, "data.download"),
    ({"data": 3}, "data"),
    ({"diffusion": {"epochs": "forever"}}, "diffusion.epochs"),
    ({"diffusion": {"contrastive_form": "cosine"}}, "diffusion.contrastive_form"),
    ({"diffusion": {"checkpoint_every": 0}}, "diffusion.checkpoint_every"),
    ({"features": {"select": "probe"}}, "features.select"),  # removed in 1.0: only its kept value loads
    ({"classifier": {"score_norm": "softmax"}}, "classifier.score_norm"),
    ({"classifier": {"cycle_form": "posterior"}}, "classifier.cycle_form"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(values)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\nclassifier: {lr: 0.01}\n")
    cfg = load_config(p, ["classifier.epochs=2", "data.max_train=100"])
    assert cfg.seed == 3 and cfg.classifier.lr == 0.01 and cfg.classifier.epochs == 2
    assert cfg.data.max_train == 100
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")


def test_epochs_auto_and_legacy_values():
    from dcube.config import with_legacy_values

    assert from_dict({"diffusion": {"epochs": "auto"}}).diffusion.epochs == "auto"
    old = with_legacy_values({"classifier": {"lr": 0.01}, "data": {}})
    assert old["classifier"]["flip_augment"] is False and old["data"]["duplicates"] == "exact"
    assert with_legacy_values({"classifier": {"flip_augment": True}})["classifier"]["flip_augment"] is True


def test_a_removed_key_loads_with_the_kept_behaviour_and_refuses_a_removed_variant():
    """An old run's config.yaml names the removed keys with the values dcube 1.0 kept: it loads; a value that
    asks for a removed variant is refused naming the key; a key that only tuned a removed variant loads."""
    old = {"classifier": {"score_norm": "none", "cycle_form": "soft", "cycle_trials": 8, "ce_weight": 1.0},
           "features": {"select": "ks_map", "timesteps": None, "condition": "uniform", "ks_values": 1000},
           "diffusion": {"loss_weighting": "uniform", "min_snr_gamma": 5.0}, "latent": {"contrastive": False}}
    assert from_dict(old).to_dict() == from_dict({}).to_dict()
    for section, key, value in (("features", "timesteps", [10, 50]), ("diffusion", "loss_weighting", "min_snr"),
                                ("latent", "contrastive", True), ("classifier", "ce_weight", 2.0)):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: removed in dcube 1\.0"):
            from_dict({section: {key: value}})
    # a kept value that depends on its neighbours: each contrastive form's own margin
    paper = {"contrastive_form": "paper", "contrastive_weight": 1.0}
    assert from_dict({"diffusion": {**paper, "contrastive_margin": 0.1}}) == from_dict({"diffusion": paper})
    assert from_dict({"diffusion": {"contrastive_margin": 1.0}}) == from_dict({})
    for section in ({**paper, "contrastive_margin": 1.0}, {"contrastive_margin": 0.1}):
        with pytest.raises(ConfigError, match=r"diffusion\.contrastive_margin: removed in dcube 1\.0"):
            from_dict({"diffusion": section})


def test_yaml_off_means_the_off_choice_of_data_duplicates(tmp_path):
    from dcube.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("data: {duplicates: off}\n")  # YAML 1.1 reads a bare off as false
    assert load_config(p).data.duplicates == "off"


def test_the_configuration_has_at_most_65_keys():
    """dcube 1.0's promise: a configuration a newcomer reads in one screen (docs/config.md lists them)."""
    def leaves(d):
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in d.values())

    assert leaves(from_dict({}).to_dict()) <= 65
