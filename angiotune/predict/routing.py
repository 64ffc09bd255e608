"""Which vessel's adapter to use, from the C-arm angles: the nearest standard view.

The standard views live in ``taxonomies/views.yaml``. Views of different vessels can sit close
together (LAO cranial shows the LAD and, a few degrees away, the RCA); when the nearest views of
two vessels are within ``ambiguity_deg``, the route says so, and the CASS head, when the adapter
has one, gets the last word (``second_opinion``). The view cannot say which vessel a box is on
when one left injection shows the LAD and the LCX, or when a lesion is filmed in another
vessel's view; the heads' vessel read, which weighs the view with the frame's tree, can, and
where it named the training lesions' vessels better than the view did, it decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from angiotune.data.angles import format_primary, format_secondary
from angiotune.taxonomies.views import ADAPTER_VESSELS, ViewTable, load_views


@dataclass(frozen=True)
class Route:
    """The chosen vessel (None when the angles are missing) and why, in words."""

    vessel: str | None
    reason: str
    view: str | None = None
    ambiguous: bool = False
    alternative: str | None = None

    def as_dict(self) -> dict:
        return {"vessel": self.vessel, "reason": self.reason, "view": self.view,
                "ambiguous": self.ambiguous, "alternative": self.alternative}


def route_by_angles(lao_deg: float | None, cranial_deg: float | None,
                    table: ViewTable | None = None) -> Route:
    """The vessel whose standard view is nearest to the given angles (stored convention)."""
    table = table or load_views()
    if lao_deg is None or cranial_deg is None or not (math.isfinite(lao_deg)
                                                       and math.isfinite(cranial_deg)):
        return Route(None, "no positioner angles in the input")
    nearest = {vessel: min(table.of(vessel), key=lambda v: v.distance(lao_deg, cranial_deg))
               for vessel in ADAPTER_VESSELS}
    ranked = sorted(nearest.values(), key=lambda v: v.distance(lao_deg, cranial_deg))
    best, runner_up = ranked[0], ranked[1]
    gap = runner_up.distance(lao_deg, cranial_deg) - best.distance(lao_deg, cranial_deg)
    seen = f"{format_primary(lao_deg)} {format_secondary(cranial_deg)}"
    reason = (f"{seen} is nearest the {best.name} view "
              f"({best.distance(lao_deg, cranial_deg):.0f} deg away), a standard {best.vessel} "
              "view")
    ambiguous = gap < table.ambiguity_deg
    if ambiguous:
        reason += (f"; the {runner_up.name} view of the {runner_up.vessel} is only {gap:.0f} deg "
                   "further, so the angles alone are not decisive")
    return Route(best.vessel, reason, best.name, ambiguous,
                 runner_up.vessel if ambiguous else None)


def second_opinion(route: Route, head_vessel: str | None, grounds: str,
                   probability: float, available: set[str], decides: bool = False) -> Route:
    """The route after the heads have spoken (``grounds``: what their vote rests on, in words).
    ``decides``: their vote is a vessel read that named the vessels of its training lesions
    better than the view did (it weighs the view itself): it then routes. Otherwise they
    decide only where the angles could not (missing, or ambiguous), and then only when sure:
    their ``probability`` for the vessel must reach ``head_override_probability``."""
    if head_vessel is None:
        return route
    table = load_views()
    adapter = table.adapter_for.get(head_vessel, head_vessel)
    heard = f"{grounds}: {adapter} with p={probability:.2f}"
    if adapter == route.vessel:
        return Route(route.vessel, f"{route.reason}; {heard}: it agrees", route.view,
                     route.ambiguous, route.alternative)
    if decides and adapter in available:
        return Route(adapter, f"{route.reason}; {heard}, and this read, which weighs the view "
                     "with the frame, named its training lesions' vessels better than the view "
                     f"did, so the {adapter} adapter was used", route.view, route.ambiguous,
                     route.vessel)
    undecided = route.vessel is None or route.ambiguous
    if undecided and adapter in available and probability >= table.head_override_probability:
        return Route(adapter, f"{route.reason}; {heard}, so the {adapter} adapter was used",
                     route.view, route.ambiguous, route.vessel)
    why = ("the view decides" if not undecided else
           f"below the {table.head_override_probability:.2f} needed to overrule it"
           if adapter in available else f"but no {adapter} adapter is kept")
    return Route(route.vessel, f"{route.reason}; {heard}, {why}", route.view, route.ambiguous,
                 route.alternative)
