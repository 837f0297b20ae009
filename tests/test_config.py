"""Config: defaults, YAML, overrides, section shorthand, errors that name the key."""

import pytest

from tfkarpa import config, runs
from tfkarpa.errors import TfkarpaError
from pipelines import _cli


def test_overrides_convert_to_field_types():
    cfg = config.build(overrides=["epochs=3", "optimizer.lr=1e-3", "data.cache=false",
                                  "optimizer.step_epochs=30,60", "model.width=0.5"])
    assert cfg.epochs == 3 and cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.data.cache is False
    assert cfg.optimizer.step_epochs == [30, 60]
    assert cfg.model.width == 0.5


def test_section_shorthand_sets_main_field():
    cfg = config.build(overrides=["data=digits", "model=resnet", "optimizer=adam"])
    assert (cfg.data.source, cfg.model.name, cfg.optimizer.name) == ("digits", "resnet", "adam")


def test_yaml_sections_and_shorthand(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: digits, image_size: 16}\nmodel: resnet\nepochs: 4\n")
    cfg = config.build([path], ["epochs=5"])
    assert (cfg.data.source, cfg.data.image_size, cfg.model.name, cfg.epochs) == ("digits", 16, "resnet", 5)


@pytest.mark.parametrize("override, expected", [
    ("optimzer.lr=0.1", "did you mean 'optimizer.lr'"),
    ("epoch=3", "did you mean 'epochs'"),
    ("data.imagesize=3", "did you mean 'data.image_size'"),
    ("epochs=three", "config key 'epochs'"),
    ("epochs=2.5", "config key 'epochs'"),
    ("data.cache=maybe", "config key 'data.cache'"),
    ("data.augment=strng", "did you mean 'strong'"),
    ("batch_size=-4", "'batch_size' must be positive"),
    ("data.val_fraction=1.5", "'data.val_fraction' must be in [0, 1)"),
    ("model.dropout=-0.1", "'model.dropout'"),
    ("noequals", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(TfkarpaError, match=None) as err:
        config.build(overrides=[override])
    assert expected in str(err.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\ndata: [unclosed\n")
    with pytest.raises(TfkarpaError, match=r"bad.yaml line \d+"):
        config.build([bad])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochs: 3\nlerning_rate: 0.1\n")
    with pytest.raises(TfkarpaError, match=r"'lerning_rate' in .*unknown.yaml"):
        config.build([unknown])
    with pytest.raises(TfkarpaError, match="config file not found"):
        config.build([tmp_path / "missing.yaml"])


def test_every_recipe_loads_and_is_valid():
    names = _cli.recipe_names()
    assert "demo" in names
    for name in names:
        cfg = config.build([_cli.resolve_recipe(name)])
        # Recipes tuned on one data set fix their length; the data-adaptive ones leave it auto
        # (federated: the length is rounds x local epochs).
        assert cfg.epochs > 0 or name in ("classify", "detect", "segment", "federated"), name


def test_unknown_recipe_suggests_closest():
    with pytest.raises(TfkarpaError, match="did you mean 'demo'"):
        _cli.resolve_recipe("demoo")


def test_saved_config_round_trips(tmp_path):
    import yaml

    cfg = config.build(overrides=["data=digits", "optimizer.step_epochs=3,6", "seed=7"])
    runs.save_config(cfg, tmp_path / "config.yaml")
    again = config.build(base=yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_help_lists_every_key():
    text = _cli.keys_help()
    for key in config.all_keys():
        assert f"  {key} " in text
