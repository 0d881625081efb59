import pytest

from dcube.config import ConfigError, RunConfig, from_dict, load_config


def test_defaults_are_the_demo():
    cfg = from_dict({})
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "pneumoniamnist" and cfg.data.image_size == 28
    assert cfg.features.ks_alpha == 0.05 and cfg.classifier.ema_decay == 0.999


@pytest.mark.parametrize("values, field", [
    ({"classifier": {"epochz": 3}}, "classifier.epochz"),
    ({"diffusion": {"backbone": "vit"}}, "diffusion.backbone"),
    ({"diffusion": {"epochs": "ten"}}, "diffusion.epochs"),
    ({"features": {"timestep": 1000}}, "features.timestep"),
    ({"features": {"ks_alpha": 1.5}}, "features.ks_alpha"),
    ({"data": {"source": "folder"}}, "data.path"),
    ({"classifier": {"cycle_weight": -1}}, "classifier.cycle_weight"),
    ({"data": {"download": "yes"}}, "data.download"),
    ({"data": 3}, "data"),
    ({"diffusion": {"epochs": "forever"}}, "diffusion.epochs"),
    ({"diffusion": {"contrastive_form": "cosine"}}, "diffusion.contrastive_form"),
    ({"diffusion": {"loss_weighting": "p2"}}, "diffusion.loss_weighting"),
    ({"diffusion": {"eval_every": 0}}, "diffusion.eval_every"),
    ({"features": {"select": "random"}}, "features.select"),
    ({"features": {"timesteps": [10, 1000]}}, "features.timesteps"),
    ({"classifier": {"score_norm": "sigmoid"}}, "classifier.score_norm"),
    ({"classifier": {"cycle_form": "hard"}}, "classifier.cycle_form"),
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
    old = with_legacy_values({"classifier": {"lr": 0.01}, "latent": {}})
    assert old["classifier"]["score_norm"] == "softmax" and old["classifier"]["cycle_form"] == "soft"
    assert old["latent"]["contrastive"] is True
    assert with_legacy_values({"classifier": {"score_norm": "none"}})["classifier"]["score_norm"] == "none"


def test_yaml_off_means_the_off_choice_of_data_duplicates(tmp_path):
    from dcube.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("data: {duplicates: off}\n")  # YAML 1.1 reads a bare off as false
    assert load_config(p).data.duplicates == "off"
