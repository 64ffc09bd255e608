"""Vessel routing from the view angles, the CASS head's second opinion, and the view table."""

from __future__ import annotations

import pytest

from angiotune.errors import ConfigError
from angiotune.predict.routing import route_by_angles, second_opinion
from angiotune.taxonomies.views import load_views

ALL = {"RCA", "LAD", "LCX"}


@pytest.mark.parametrize("lao, cranial, vessel", [
    (45, 0, "RCA"),      # LAO straight
    (-30, 0, "RCA"),     # RAO straight
    (-30, 30, "LAD"),    # RAO cranial
    (0, 35, "LAD"),      # AP cranial
    (-25, -25, "LCX"),   # RAO caudal
    (40, -30, "LCX"),    # LAO caudal, the spider view
    (50, 2, "RCA"),      # a few degrees off a standard view still routes
    (-20, -35, "LCX"),
])
def test_standard_views_route_to_their_vessel(lao, cranial, vessel):
    route = route_by_angles(lao, cranial)
    assert route.vessel == vessel
    assert not route.ambiguous
    assert route.view in route.reason


def test_lao_cranial_is_flagged_ambiguous_between_lad_and_rca():
    route = route_by_angles(40, 25)
    assert route.vessel == "LAD" and route.ambiguous and route.alternative == "RCA"
    assert "not decisive" in route.reason


def test_missing_angles_leave_the_choice_open():
    route = route_by_angles(None, 20.0)
    assert route.vessel is None and "no positioner angles" in route.reason
    assert route_by_angles(float("nan"), 0.0).vessel is None


def test_the_head_decides_only_where_the_angles_cannot():
    ambiguous = route_by_angles(40, 25)
    switched = second_opinion(ambiguous, "RCA", "the CASS head reads mid RCA (CASS 2)", 0.8, ALL)
    assert switched.vessel == "RCA"
    assert "the CASS head reads mid RCA (CASS 2): RCA with p=0.80" in switched.reason
    clear = route_by_angles(-25, -25)
    kept = second_opinion(clear, "LAD", "mid LAD (CASS 13)", 0.9, ALL)
    assert kept.vessel == "LCX" and "the view decides" in kept.reason
    agreed = second_opinion(clear, "LCX", "proximal circumflex (CASS 18)", 0.7, ALL)
    assert agreed.vessel == "LCX" and "agrees" in agreed.reason
    unsure = second_opinion(ambiguous, "RCA", "mid RCA (CASS 2)", 0.6, ALL)
    assert unsure.vessel == "LAD" and "needed to overrule" in unsure.reason


def test_the_head_routes_when_there_are_no_angles_and_maps_left_main_to_lad():
    open_route = route_by_angles(None, None)
    assert second_opinion(open_route, "LM", "left main (CASS 11)", 0.9, ALL).vessel == "LAD"
    # A vessel whose adapter is not kept cannot be switched to.
    assert second_opinion(route_by_angles(40, 25), "RCA", "mid RCA", 0.8,
                          {"LAD"}).vessel == "LAD"


def test_view_table_is_validated(tmp_path):
    bad = tmp_path / "views.yaml"
    bad.write_text("ambiguity_deg: 10\nhead_override_probability: 0.8\nadapter_for: {RCA: RCA, "
                   "LAD: LAD, LCX: LCX, LM: LAD, RAMUS: LCX}\nviews:\n"
                   "  - {name: odd, vessel: OM1, lao: 0, cranial: 0}\n")
    with pytest.raises(ConfigError, match=r"views\[0\]\.vessel"):
        load_views(bad)
    bad.write_text("ambiguity_deg: 10\nhead_override_probability: 0.8\n"
                   "adapter_for: {RCA: RCA}\nviews: []\n")
    with pytest.raises(ConfigError, match="adapter_for"):
        load_views(bad)
    bad.write_text("ambiguity_deg: 10\nviews: []\n")
    with pytest.raises(ConfigError, match="expected exactly the keys"):
        load_views(bad)
