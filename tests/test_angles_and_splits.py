"""View angle conventions, patient-level splits, vessel text and the segment taxonomies."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from angiotune.data import angles
from angiotune.data.free_text import normalise_phase, parse_vessel_text
from angiotune.data.ingest import _csv_angle
from angiotune.data.splits import SPLITS, assign_splits
from angiotune.errors import ConfigError
from angiotune.taxonomies import VESSELS, load_taxonomy

# --- angles ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("csv_value", "stored"), [(30, -30.0), (-45, 45.0), (0, 0.0),
                                                   ("30", -30.0), ("-12.5", 12.5)])
def test_csv_primary_angle_is_rao_positive(csv_value, stored):
    value = angles.lao_from_csv_primary(float(csv_value))
    assert value == stored
    assert _csv_angle(str(csv_value), primary=True) == stored


def test_zero_is_not_negative_zero():
    assert str(angles.lao_from_csv_primary(0.0)) == "0.0"


@pytest.mark.parametrize(("text", "stored"), [("LAO 45", 45.0), ("RAO 30", -30.0),
                                              ("lao45", 45.0), ("RAO. 12.5°", -12.5),
                                              ("AP", 0.0), ("PA", 0.0)])
def test_labelled_primary(text, stored):
    assert angles.parse_primary(text) == stored
    assert _csv_angle(text, primary=True) == stored  # a label is not negated


@pytest.mark.parametrize(("text", "stored"), [("CAUDAL 25", -25.0), ("CRANIAL 25", 25.0),
                                              ("CRA 30", 30.0), ("caud 10", -10.0),
                                              ("STRAIGHT", 0.0)])
def test_labelled_secondary(text, stored):
    assert angles.parse_secondary(text) == stored
    assert _csv_angle(text, primary=False) == stored


@pytest.mark.parametrize("text", ["LAO", "LEFT 45", "CRANIAL 25", "RAO 200", "", "45 LAO"])
def test_unreadable_primary(text):
    assert angles.parse_primary(text) is None


@pytest.mark.parametrize("text", ["CAUDAL 95", "LAO 20", "up 10"])
def test_unreadable_secondary(text):
    assert angles.parse_secondary(text) is None


def test_numeric_secondary_is_kept_as_is():
    assert _csv_angle("25", primary=False) == 25.0
    assert _csv_angle("-25", primary=False) == -25.0
    assert _csv_angle("", primary=True) is None
    assert _csv_angle("nan", primary=True) is None


@given(st.floats(min_value=-180, max_value=180, allow_nan=False).map(lambda x: round(x, 1)))
def test_format_then_parse_primary_round_trips(lao):
    assert angles.parse_primary(angles.format_primary(lao)) == pytest.approx(lao)


@given(st.floats(min_value=-90, max_value=90, allow_nan=False).map(lambda x: round(x, 1)))
def test_format_then_parse_secondary_round_trips(cranial):
    assert angles.parse_secondary(angles.format_secondary(cranial)) == pytest.approx(cranial)


# --- splits ----------------------------------------------------------------------------------

rows_strategy = st.lists(
    st.tuples(st.text(alphabet="ABCDEFGHIJ0123456789", min_size=1, max_size=4),
              st.sampled_from(VESSELS)),
    min_size=1, max_size=80)


def _split_by_patient(rows, splits) -> dict[str, set[str]]:
    by_patient: dict[str, set[str]] = defaultdict(set)
    for (patient, _), split in zip(rows, splits, strict=True):
        by_patient[patient].add(split)
    return by_patient


@settings(deadline=None)
@given(rows_strategy, st.integers(min_value=0, max_value=2**31))
def test_no_patient_in_two_splits(rows, seed):
    splits = assign_splits([p for p, _ in rows], [v for _, v in rows], seed=seed)
    assert len(splits) == len(rows)
    assert set(splits) <= set(SPLITS)
    assert all(len(s) == 1 for s in _split_by_patient(rows, splits).values())


@settings(deadline=None)
@given(rows_strategy, st.integers(min_value=0, max_value=2**31))
def test_splits_are_deterministic(rows, seed):
    patients, vessels = [p for p, _ in rows], [v for _, v in rows]
    assert assign_splits(patients, vessels, seed=seed) == \
        assign_splits(list(patients), list(vessels), seed=seed)


@settings(deadline=None)
@given(rows_strategy, st.integers(min_value=0, max_value=2**31), st.randoms(use_true_random=False))
def test_splits_do_not_depend_on_row_order(rows, seed, rng: random.Random):
    shuffled = list(rows)
    rng.shuffle(shuffled)
    first = assign_splits([p for p, _ in rows], [v for _, v in rows], seed=seed)
    second = assign_splits([p for p, _ in shuffled], [v for _, v in shuffled], seed=seed)
    before = {p: s.pop() for p, s in _split_by_patient(rows, first).items()}
    after = {p: s.pop() for p, s in _split_by_patient(shuffled, second).items()}
    assert before == after


def test_split_fractions_are_respected():
    patients = [f"P{i:04d}" for i in range(1000)]
    splits = assign_splits(patients, ["LAD"] * 1000)
    assert [splits.count(s) for s in SPLITS] == [700, 150, 150]
    # Another seed shuffles patients but keeps the proportions.
    other = assign_splits(patients, ["LAD"] * 1000, seed=1)
    assert other != splits and [other.count(s) for s in SPLITS] == [700, 150, 150]


def test_splits_are_stratified_by_vessel():
    patients = [f"P{i:04d}" for i in range(200)]
    vessels = ["RCA"] * 100 + ["LCX"] * 100
    splits = assign_splits(patients, vessels)
    for vessel in ("RCA", "LCX"):
        mine = [s for s, v in zip(splits, vessels, strict=True) if v == vessel]
        assert [mine.count(s) for s in SPLITS] == [70, 15, 15]


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(["a"], ["LAD"], fractions)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        assign_splits(["a", "b"], ["LAD"])


# --- vessel text and phases ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "vessels"), [
    ("MID RCA FINAL", {"RCA"}), ("mid-lcx", {"LCX"}), ("PROX LAD", {"LAD"}),
    ("see report", set()), ("LESION 1", set()), ("", set()), ("D1", {"LAD"}),
    ("om 1", {"LCX"}), ("LEFT MAIN", {"LM"}), ("RAMUS", {"RAMUS"}), ("LAD-Proximal", {"LAD"}),
    ("rpda post", {"RCA"}), ("LAD/LCX", {"LAD", "LCX"}),
])
def test_parse_vessel_text(text, vessels):
    assert parse_vessel_text(text) == vessels


def test_parse_vessel_text_rejects_non_text():
    assert parse_vessel_text(None) == set()
    assert parse_vessel_text(13) == set()


@pytest.mark.parametrize(("text", "phase"), [("INDEX BASELINE", "BASELINE"), ("pre", "PRE"),
                                             ("Post-PCI", "POST"), ("FINAL", "FINAL"),
                                             ("follow up", "FOLLOW-UP"), ("??", "UNKNOWN"),
                                             (None, "UNKNOWN")])
def test_normalise_phase(text, phase):
    assert normalise_phase(text) == phase


# --- taxonomies ------------------------------------------------------------------------------


def test_cass_mid_lad():
    cass = load_taxonomy("CASS")
    segment = cass.lookup(13)
    assert segment is not None
    assert (segment.code, segment.name, segment.vessel, segment.position) == \
        ("13", "mid LAD", "LAD", "mid")
    assert cass.lookup("13") == cass.lookup(13.0) == cass.lookup(" 13 ") == segment
    assert cass.lookup(99) is None and cass.lookup("13.5") is None
    assert cass.lookup(11).vessel == "LM" and cass.lookup(28).vessel == "RAMUS"
    assert set(cass.segments) == {str(i) for i in range(1, 30)}


def test_syntax_loads():
    syntax = load_taxonomy("SYNTAX")
    assert syntax.name == "SYNTAX"
    assert syntax.lookup("9a").vessel == "LAD"
    assert syntax.lookup("9A") == syntax.lookup("9a")
    assert syntax.lookup(7).name == "LAD mid"
    assert syntax.lookup(5).vessel == "LM"
    assert {s.vessel for s in syntax.segments.values()} == set(VESSELS)


def test_taxonomy_from_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: MINE\nsegments:\n  1: {name: a, vessel: RCA, position: proximal}\n")
    taxonomy = load_taxonomy(str(path))
    assert taxonomy.name == "MINE" and taxonomy.lookup(1).vessel == "RCA"


def test_bad_taxonomy_vessel_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: BAD\nsegments:\n"
                    "  1: {name: a, vessel: RCA, position: proximal}\n"
                    "  7: {name: b, vessel: XYZ, position: mid}\n")
    with pytest.raises(ConfigError) as error:
        load_taxonomy(str(path))
    assert "segments.7.vessel" in str(error.value)
    assert "XYZ" in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(("body", "key"), [
    ("name: B\nsegments:\n  1: {name: a, vessel: RCA, position: middle}\n",
     "segments.1.position"),
    ("name: B\nsegments:\n  1: {name: a, vessel: RCA}\n", "segments.1"),
    ("name: B\nsegments:\n  1: {name: a, vessel: RCA, position: mid}\n"
     "  '1.0': {name: b, vessel: RCA, position: mid}\n", "duplicate"),
    ("name: B\nsegments: {}\n", "segments"),
    ("name: B\n", "'name' and 'segments'"),
])
def test_bad_taxonomy_structure(tmp_path, body, key):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_taxonomy(str(path))


def test_unknown_taxonomy_name():
    with pytest.raises(ConfigError, match="NOPE"):
        load_taxonomy("NOPE")
