"""Search space YAML: the shipped spaces load; each kind of mistake is refused naming the key."""

import copy
import dataclasses
import re

import optuna
import pytest

from angiotune.errors import ConfigError
from angiotune.search.space import SPACES_DIR, Param, load_space, parse_space

VALID = {
    "name": "t", "metric": "dice", "mode": "max", "samples": 2, "epochs": 2,
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "fixed": {"strategy": "lora"},
    "params": {
        "rank": {"type": "int", "low": 2, "high": 8, "log": True},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "pixel_loss": {"type": "categorical", "choices": ["focal", "bce"]},
        "pos_weight": {"type": "float", "low": 2.0, "high": 20.0, "when": {"pixel_loss": "bce"}},
    },
}


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert space.samples >= 1 and space.params


def test_define_by_run_suggests_conditionals_only_when_they_apply():
    space = parse_space(VALID, "valid.yaml")
    focal = optuna.trial.FixedTrial({"rank": 4, "lr": 1e-3, "pixel_loss": "focal"})
    assert space.define_by_run(focal) == {"strategy": "lora"}
    assert "pos_weight" not in focal.params
    bce = optuna.trial.FixedTrial({"rank": 4, "lr": 1e-3, "pixel_loss": "bce", "pos_weight": 5.0})
    space.define_by_run(bce)
    assert bce.params["pos_weight"] == 5.0


def _broken(change):
    raw = copy.deepcopy(VALID)
    change(raw)
    return raw


@pytest.mark.parametrize(("change", "key"), [
    (lambda r: r.update(colour="red"), "colour"),
    (lambda r: r.update(samples="eight"), "samples"),
    (lambda r: r.update(mode="maximise"), "mode"),
    (lambda r: r.update(resources={"retries": -1}), "resources.retries"),
    (lambda r: r["params"].update(depth={"type": "int", "low": 1, "high": 3}), "params.depth"),
    (lambda r: r["params"]["rank"].update(type="integer"), "params.rank.type"),
    (lambda r: r["params"]["lr"].update(low=0.1, high=0.01), "params.lr"),
    (lambda r: r["params"]["lr"].update(low=0.0), "params.lr"),
    (lambda r: r["params"]["pixel_loss"].update(choices=[]), "params.pixel_loss.choices"),
    (lambda r: r["params"]["pos_weight"].update(when={"optimizer": "adam"}),
     "params.pos_weight.when"),
    (lambda r: r["params"].update(targets={"type": "categorical",
                                           "choices": ["vision_qv", "text_encoder"]}),
     "params.targets.choices"),
    (lambda r: r["fixed"].update(strategy="adapters"), "fixed.strategy"),
    (lambda r: r["asha"].update(grace_period=5), "grace_period"),
    (lambda r: r["asha"].update(halving=3), "asha"),
    (lambda r: r.update(stage=4), "stage"),
    (lambda r: r.update(metric="stenosis_mae"), "stenosis_mae"),  # needs heads
    (lambda r: r.update(metric="dice/LEFT"), "metric"),
    (lambda r: r.update(metric=["dice", "stenosis_mae"], mode=["max", "min"], stage=2),
     "asha"),  # ASHA cannot prune a multi-objective search
    (lambda r: r.update(metric=["dice", "iou"], mode="max"), "metric"),
    (lambda r: r.update(metric="objective"), "objective"),
    (lambda r: r.update(objective={"dice": 1, "speed": 2}), "objective.speed"),
    (lambda r: r.update(vessels=["LAD"]), "vessels"),  # only stage 3
    (lambda r: r.update(stage=3, vessels=["LAD", "LM"], asha=None), "vessels"),
    (lambda r: r.update(stage=3, asha=None), "vessels"),
    (lambda r: r.update(stage=3, vessels=["LAD"]), "asha"),  # vessels are not comparable
    (lambda r: r.update(stage=3, vessels=["LAD"], asha=None, metric="dice/LAD"), "metric"),
    (lambda r: r.update(mode="min"), "mode"),  # Dice is better when higher
    (lambda r: r["fixed"].update(init="vessel"), "init"),  # only stage 3
    (lambda r: r["fixed"].update(init="yesterday"), "fixed.init"),
    (lambda r: r["fixed"].update(head_weighting="learned"), "fixed.head_weighting"),
    (lambda r: r.update(stage=2, fixed={"heads": False}), "fixed.heads"),
    (lambda r: r.update(stage=2, fixed={"prompt_mode": "text_box"}), "prompt_mode"),
    (lambda r: r.update(select="stenosis_mae"), "select"),
    (lambda r: r.update(fixed={"prompt_mode": "text_box", "refine": True}), "refine"),
    (lambda r: r["fixed"].update(crop_context=0.5), "fixed.crop_context"),  # inside its box
    (lambda r: r["fixed"].update(refine="yes"), "fixed.refine"),
    (lambda r: r.update(sampler="grid"), "sampler"),
    (lambda r: r.update(data={"stream": "block"}), "data.stream"),
    (lambda r: r["fixed"].update(embedding_cache="yes"), "fixed.embedding_cache"),
    (lambda r: r["fixed"].update(embedding_cache=True), "embedding_cache"),  # lora on vision
    (lambda r: r.update(fixed={"embedding_cache": True},
                        params={"strategy": {"type": "categorical",
                                             "choices": ["decoder_only", "full"]}}),
     "embedding_cache"),  # full would train the encoder
    (lambda r: r.update(fixed={"strategy": "decoder_only", "embedding_cache": True,
                               "init": "best"}), "embedding_cache"),
    (lambda r: r["params"].update(embedding_cache={"type": "categorical",
                                                   "choices": [True, False]}),
     "params.embedding_cache"),  # fixed only
    (lambda r: r["fixed"].update(lora_depth=0), "fixed.lora_depth"),
    (lambda r: r["fixed"].update(lora_depth=1.5), "fixed.lora_depth"),
    (lambda r: r["fixed"].update(augment_views=-1), "fixed.augment_views"),
    (lambda r: r["params"].update(augment_views={"type": "int", "low": 0, "high": 4}),
     "params.augment_views"),  # fixed only: the data every trial reads
    (lambda r: r["fixed"].update(embedding_cache=True) or r["params"].update(
        lora_depth={"type": "categorical", "choices": [0.5, 1.0]}),
     "embedding_cache"),  # a trial with LoRA on every block would train the cached blocks
])
def test_mistakes_are_refused_naming_the_key(change, key):
    with pytest.raises(ConfigError) as error:
        parse_space(_broken(change), "space.yaml")
    assert "space.yaml" in str(error.value) and key in str(error.value)


def test_a_replaced_space_is_checked_again():
    """``dataclasses.replace`` makes a new space through ``__post_init__``: it cannot skip the
    rules a file is held to."""
    space = parse_space(VALID, "space.yaml")
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(space, samples=-1)
    assert str(error.value) == "samples: -1 is below the minimum 1"


@pytest.mark.parametrize(("change", "key"), [
    ({"samples": "8"}, "samples: expected int"),
    ({"epochs": 0}, "epochs"),
    ({"retries": -1}, "resources.retries"),
    ({"image_size": 16}, "data.image_size"),
    ({"grace_period": 5}, "asha.grace_period"),
    ({"stage": 4}, "stage"),
    ({"stage": 3}, "asha"),  # vessels are not comparable on one scale
    ({"stage": 3, "asha": False}, "vessels"),
    ({"vessels": ("LAD",)}, "vessels"),  # only stage 3
    ({"mode": "min"}, "mode"),
    ({"metric": "dice/LEFT"}, "metric"),
    ({"metric": ("dice", "iou"), "mode": ("max", "max")}, "asha"),
    ({"metric": "stenosis_mae", "mode": "min"}, "heads"),
    ({"objective": {"speed": 1.0}}, "objective.speed"),
    ({"select": "stenosis_mae"}, "select"),
    ({"sampler": "grid"}, "sampler"),
    ({"stream": "forever"}, "data.stream"),
    ({"fixed": {"strategy": "adapters"}}, "fixed.strategy"),
    ({"fixed": {"strategy": "lora", "init": "vessel"}}, "init"),
    ({"params": ()}, "params"),
    ({"params": (Param("lr", "float", 1e-4, 1e-2, log=True, when={"optimizer": "adam"}),)},
     "params.lr.when"),
])
def test_replace_refuses_what_a_file_would(change, key):
    space = parse_space(VALID, "space.yaml")
    with pytest.raises(ConfigError, match=re.escape(key)):
        dataclasses.replace(space, **change)


def test_replace_keeps_a_valid_space_as_a_file_gives_it():
    space = parse_space(VALID, "space.yaml")
    wider = dataclasses.replace(space, samples=40, cpus_per_worker=2,
                                metric=["dice", "iou"], mode=["max", "max"], asha=False)
    assert wider.samples == 40 and wider.multi_objective
    assert wider.metric == ("dice", "iou") and wider.mode == ("max", "max")
    assert isinstance(wider.cpus_per_worker, float)  # as parse_space gives it
    assert dataclasses.replace(wider) == wider


def test_a_parameter_made_by_hand_is_checked():
    with pytest.raises(ConfigError, match="params.lr: empty range"):
        Param("lr", "float", 0.1, 0.01)
    with pytest.raises(ConfigError, match=re.escape("params.crop_context.high")):
        Param("crop_context", "float", 2.0, 12.0)  # past the widest crop
    assert Param("lr", "float", 1, 2).low == 1.0


def test_prompt_mode_is_fixed_per_search():
    raw = copy.deepcopy(VALID)
    raw["params"]["prompt_mode"] = {"type": "categorical", "choices": ["box", "text_box"]}
    with pytest.raises(ConfigError, match="params.prompt_mode"):
        parse_space(raw, "space.yaml")
    raw = copy.deepcopy(VALID)
    raw["fixed"]["prompt_mode"] = "speech"
    with pytest.raises(ConfigError, match="fixed.prompt_mode"):
        parse_space(raw, "space.yaml")


def test_stage_two_implies_heads_and_multi_objective_runs_without_asha():
    raw = copy.deepcopy(VALID)
    raw.update(stage=2, metric=["dice", "stenosis_mae"], mode=["max", "min"], asha="off")
    space = parse_space(raw, "space.yaml")
    assert space.heads and space.multi_objective and not space.asha
    assert space.metric == ("dice", "stenosis_mae")


def test_stage_three_lists_vessels_and_init_choices():
    raw = copy.deepcopy(VALID)
    raw.update(stage=3, vessels=["RCA", "LAD"], asha=None)
    raw["params"]["init"] = {"type": "categorical", "choices": ["vessel", "none"]}
    space = parse_space(raw, "space.yaml")
    assert space.vessels == ("RCA", "LAD") and space.init_choices() == {"vessel", "none"}


@pytest.mark.parametrize(("name", "kind"), [("tpe", optuna.samplers.TPESampler),
                                            ("random", optuna.samplers.RandomSampler)])
def test_sampler_is_chosen_by_the_space(name, kind, tmp_path):
    from angiotune.search.run import _optuna_search

    space = parse_space({**VALID, "sampler": name, "samples": 12}, "s.yaml")
    searcher = _optuna_search(space, tmp_path)
    assert type(searcher._sampler) is kind
    if kind is optuna.samplers.TPESampler:  # not Optuna's 10, which leaves small searches random
        assert searcher._sampler._n_startup_trials == 4


def test_trials_at_once_leave_the_data_tasks_a_cpu():
    """Trials that held every CPU would wait forever for their Ray Data decoding tasks: on a
    2-CPU machine two one-CPU trials run one at a time instead."""
    from angiotune.search.trial import concurrent_trials, trial_resources

    def space(**resources):
        return parse_space({**VALID, "max_concurrent": 2, "resources": resources}, "x.yaml")

    one_cpu = space(workers=1, cpus_per_worker=1)
    assert trial_resources(one_cpu) == {"cpu": 1.0}
    assert concurrent_trials(one_cpu, 2) == 1
    assert concurrent_trials(one_cpu, 4) == 2
    assert trial_resources(space(workers=1, gpus_per_worker=1)) == {"cpu": 1.0, "gpu": 1.0}
    group = space(workers=2, cpus_per_worker=1)  # a Train worker group reserves its own CPUs
    assert trial_resources(group) == {"cpu": 0.25}
    assert concurrent_trials(group, 4) == 1
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        concurrent_trials(space(workers=1, cpus_per_worker=2), 2)


def test_the_stream_takes_whole_cpus_only_where_the_trials_leave_them():
    """On 2 cores with one trial training, decoding tasks share the remaining core (half a
    CPU each, Ray Data's reserve on); a workstation's spare cores get a task each."""
    from angiotune.search.trial import stream_plan

    one_cpu = parse_space({**VALID, "max_concurrent": 2,
                           "resources": {"workers": 1, "cpus_per_worker": 1}}, "x.yaml")
    assert stream_plan(one_cpu, 2, 1) == {"data_task_cpus": 0.5, "data_reserve": True}
    assert stream_plan(one_cpu, 3, 2) == {"data_task_cpus": 0.5, "data_reserve": True}
    assert stream_plan(one_cpu, 4, 2) == {"data_task_cpus": 1.0, "data_reserve": False}
    assert stream_plan(one_cpu, 16, 2) == {"data_task_cpus": 1.0, "data_reserve": False}


def _open_study_in_a_loop(path: str, stop) -> None:
    import contextlib
    import os

    while not stop.is_set():
        if os.path.exists(path):
            with contextlib.suppress(Exception):  # the reader only has to get in the way
                optuna.load_study(study_name="s", storage=f"sqlite:///{path}")


@pytest.mark.slow
def test_a_reader_opening_the_study_meanwhile_does_not_end_the_search(tmp_path):
    """optuna-dashboard (or any load_study) opening optuna.db while the search creates its
    tables made SQLite fail the search at its start ("table already exists", a UNIQUE
    constraint) in about two starts of three; the storage is opened again instead."""
    import multiprocessing

    from angiotune.search.run import study_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    context = multiprocessing.get_context("fork")  # reading at once, as a dashboard already open
    for attempt in range(6):
        path = tmp_path / f"optuna-{attempt}.db"
        stop = context.Event()
        reader = context.Process(target=_open_study_in_a_loop, args=(str(path), stop))
        reader.start()
        try:
            optuna.create_study(study_name="s", storage=study_storage(path), load_if_exists=True)
        finally:
            stop.set()
            reader.join()


def test_lora_on_the_last_blocks_may_use_the_embedding_cache_with_a_bank_of_views():
    raw = copy.deepcopy(VALID)
    raw["fixed"].update(embedding_cache=True, augment_views=4)
    raw["params"]["lora_depth"] = {"type": "categorical", "choices": [0.25, 0.5]}
    space = parse_space(raw, "space.yaml")
    assert space.can_take("lora_depth", 1.0) == [0.25, 0.5]
    assert space.fixed["augment_views"] == 4


def test_validate_rungs_validates_where_asha_decides_and_at_the_end():
    space = load_space("lora_rank.yaml", ["fixed.validate=rungs"])  # grace 2, factor 2, 6 epochs
    assert space.validation_epochs() == (2, 4, 6)
    assert load_space("lora_rank.yaml").validation_epochs() is None  # every epoch
    assert load_space("lora_rank.yaml", ["fixed.validate=rungs", "asha=off"]) \
        .validation_epochs() == (6,)
    with pytest.raises(ConfigError, match="not one of"):
        load_space("lora_rank.yaml", ["fixed.validate=sometimes"])
    raw = copy.deepcopy(VALID)
    raw["params"]["validate"] = {"type": "categorical", "choices": ["every", "rungs"]}
    with pytest.raises(ConfigError, match="cannot be searched"):
        parse_space(raw, "space.yaml")
