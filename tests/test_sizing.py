"""One space for every model: sizes left to auto follow the model and the cluster; --set
overrides are validated like the file."""

import pytest

from angiotune.errors import ConfigError
from angiotune.search.sizing import check_image_size, fit_space
from angiotune.search.space import SPACES_DIR, load_space, parse_space

SPACE = {
    "name": "t", "metric": "dice", "mode": "max", "samples": 2, "epochs": 2,
    "fixed": {"strategy": "lora"},
    "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
}


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_fit_the_tiny_model_on_cpu_and_sam3_on_two_gpus(path):
    space = load_space(path)
    assert (space.image_size, space.batch_size, space.gpus_per_worker) == (None, None, None)
    cpu = fit_space(space, 112, cluster_gpus=0)
    assert (cpu.image_size, cpu.batch_size, cpu.gpus_per_worker, cpu.max_concurrent) == (
        112, 8, 0, 2)
    gpus = fit_space(space, 1008, cluster_gpus=2)
    assert (gpus.image_size, gpus.batch_size, gpus.gpus_per_worker, gpus.max_concurrent) == (
        1008, 2, 1, 2)
    assert fit_space(space, 1008, cluster_gpus=0).batch_size == 1  # 1008 px on a CPU
    lr = next((p for p in space.params if p.name == "lr"), None)
    if lr is not None:  # the seed plan's learning rate is inside every searched range
        assert lr.low <= 1e-4 <= lr.high


def test_sizes_a_space_names_win_over_auto():
    space = parse_space({**SPACE, "max_concurrent": 1, "data": {"batch_size": 4},
                         "resources": {"gpus_per_worker": 0.5}}, "x.yaml")
    fitted = fit_space(space, 1008, cluster_gpus=2)
    assert (fitted.batch_size, fitted.gpus_per_worker, fitted.max_concurrent) == (4, 0.5, 1)


def test_trials_at_once_follow_the_gpus_each_trial_takes():
    space = parse_space({**SPACE, "resources": {"workers": 2, "worker_group": True}}, "x.yaml")
    assert fit_space(space, 1008, cluster_gpus=4).max_concurrent == 2
    with pytest.raises(ConfigError, match="needs 2 GPU"):
        fit_space(space, 1008, cluster_gpus=1)
    forced = parse_space({**SPACE, "resources": {"gpus_per_worker": 1}}, "x.yaml")
    with pytest.raises(ConfigError, match="Ray cluster has 0"):
        fit_space(forced, 112, cluster_gpus=0)


def test_an_image_size_the_model_cannot_take_is_refused_naming_both():
    space = parse_space({**SPACE, "data": {"image_size": 112}}, "x.yaml")
    check_image_size(space, 112, None)
    with pytest.raises(ConfigError, match=r"data.image_size 112 .*models/sam3.* 1008 px"):
        check_image_size(space, 1008, "models/sam3")
    check_image_size(parse_space({**SPACE, "data": {"image_size": "auto"}}, "x.yaml"), 1008,
                     None)


def test_overrides_are_validated_like_the_file():
    space = load_space("lora_rank.yaml", ["samples=40", "epochs=10", "data.batch_size=2",
                                          "resources.gpus_per_worker=1", "fixed.dropout=0.2"])
    assert (space.samples, space.epochs, space.batch_size, space.gpus_per_worker) == (
        40, 10, 2, 1.0)
    assert space.fixed["dropout"] == 0.2
    assert load_space("lora_rank.yaml").samples == 8  # the file itself is unchanged
    for override, message in [("samples=x", "samples: expected int"),
                              ("data.image_size=8", "below the minimum 32"),
                              ("data.colour=1", "unknown key"),
                              ("fixed.rnak=4", "unknown parameter"),
                              ("samples", "KEY=VALUE"),
                              ("a.b.c=1", "unknown key"),
                              ("params.lr.low=0", "log range needs low > 0"),
                              ("name.x=1", "not a section")]:
        with pytest.raises(ConfigError, match=message) as caught:
            load_space("lora_rank.yaml", [override])
        assert "--set" in str(caught.value)
