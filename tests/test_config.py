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
