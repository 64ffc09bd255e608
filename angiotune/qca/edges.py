"""The two lumen edges along the centerline's normals, found in the frame's own intensity.

Core-lab QCA (CMS, CAAS) does not trust a drawn outline for the edges: it samples the frame on
scanlines perpendicular to the centerline and follows each wall as a minimum-cost path. Here the
segment mask (the model's, coarse) only says where to look; the edge is where the image says.

1. Scanlines: each side of every centerline point, from a little past the centerline (it need
   not sit in the middle) out to ``band_factor`` times the mask's half-width plus a margin, so
   that a mask twice too wide still holds the true edge well inside the search band. Sampled at
   sub-pixel steps with bilinear interpolation.
2. Edge strength: the vessel is dark on a brighter background, so going outward the profile
   rises at the wall. The strength is the first derivative plus a weighted second derivative
   (Gaussian derivatives at a fixed scale of ``derivative_scale_px``). The weight is 0 (the
   first derivative alone) because the sign of the correction is not fixed by physics: a round
   lumen's attenuation (a chord length, 2 sqrt(R^2 - x^2)) rises as a square root at the wall, so
   after the blur the steepest point lies inside the wall for a lumen several blur widths wide
   (an outward correction, + ``second_derivative_weight_px``, shifts the edge out by about the
   weight in px) and outside it for lumens narrower than about two blur widths (the overestimate
   of small diameters that CMS/CAAS correct inward, a negative weight). Which wins depends on
   the lumen's width against the frame's blur, so no fixed weight serves frames of different
   blur: the edges are found uncorrected (weight 0), and then the blur is measured at the
   segment and each diameter mapped back to the round lumen that reads so
   (``angiotune.qca.blur``; ``correct_blur``). Derivatives
   of the wrong polarity (bright to dark going out, e.g. the near side of a crossing vessel) cost.
3. Costs are made relative to the strongest edges of the segment, so uint8, uint16 and float
   frames, of any contrast, are treated alike.
4. Prior: no penalty inside the mask's edge, a soft quadratic one beyond it, none past the band.
5. Dynamic programming over consecutive scanlines (about one pixel of arc apart): the edge may
   move by at most ``max_shift_px`` between neighbours, so one noisy or crossed scanline cannot
   make the wall jump; the minimum-cost path is traced back, then refined to sub-sample precision
   with a parabola through the edge strength around each chosen sample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from angiotune.qca.blur import measured_blur, true_diameters

_BLOCKED = 1e3  # cost outside the search band: never chosen while any allowed sample exists


@dataclass(frozen=True)
class EdgeSettings:
    sample_step_px: float = 0.5
    derivative_scale_px: float = 0.7
    second_derivative_weight_px: float = 0.0  # + moves edges out, - in (see above)
    max_shift_px: float = 1.0  # per scanline (scanlines are ~1 px of arc apart)
    band_factor: float = 1.5  # search out to this many mask half-widths ...
    band_margin_px: float = 3.0  # ... plus this
    inward_px: float = 2.0  # how far past the centerline an edge may lie (an off-centre line)
    prior_weight: float = 0.5  # in units of the segment's strongest edge
    outside_weight: float = 0.5  # cost of an edge whose outside is still as dark as the lumen
    outside_px: float = 2.0  # where "outside" is read, beyond the blurred wall
    weak_edge: float = 0.08  # below this relative strength a scanline has no edge: interpolated
    correct_blur: bool = True  # undo the width error of edges at the steepest point (qca.blur)


def frame_edges(frame: np.ndarray, path: np.ndarray, normal: np.ndarray,
                prior_left: np.ndarray, prior_right: np.ndarray,
                settings: EdgeSettings = EdgeSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Outward distances (px) of the left (``path + d * normal``) and right (``path - d *
    normal``) lumen edges from each centerline point; NaN where the frame shows no edge.

    ``prior_left`` / ``prior_right``: the mask's edge distances (NaN where it had none)."""
    image = np.asarray(frame, dtype=np.float32)
    if image.ndim == 3:  # an RGB export of a grey frame
        image = image.mean(axis=2)
    priors = [_smooth_prior(prior_left), _smooth_prior(prior_right)]
    if _vessel_is_bright(image, path, normal, priors):
        image = -image
    left, right = (_one_side(image, path, sign * normal, prior, settings)
                   for sign, prior in ((1.0, priors[0]), (-1.0, priors[1])))
    if settings.correct_blur:
        left, right = _unblurred(image, path, normal, left, right, settings)
    return left, right


def _unblurred(image: np.ndarray, path: np.ndarray, normal: np.ndarray, left: np.ndarray,
               right: np.ndarray, settings: EdgeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Both edges moved, symmetrically about their midpoint, to the diameter of the round lumen
    that reads as they do at the blur measured here; crossed edges are left alone."""
    blur = measured_blur(image, path, normal, left, right)
    if blur is None:
        return left, right
    measured = left + right
    diameter = np.where(measured > 0, true_diameters(
        measured, blur, settings.derivative_scale_px, settings.second_derivative_weight_px),
        measured)
    centre = 0.5 * (left - right)
    return centre + 0.5 * diameter, 0.5 * diameter - centre


def _smooth_prior(distance: np.ndarray) -> np.ndarray:
    """The mask's edge distance with gaps filled and single-scanline spikes removed."""
    distance = np.asarray(distance, dtype=float)
    valid = np.isfinite(distance) & (distance > 0)
    if not valid.any():
        return np.full(len(distance), 3.0)
    index = np.arange(len(distance))
    filled = np.interp(index, index[valid], distance[valid])
    return ndimage.median_filter(filled, size=5, mode="nearest")


def _vessel_is_bright(image: np.ndarray, path: np.ndarray, normal: np.ndarray,
                      priors: list[np.ndarray]) -> bool:
    """Whether the lumen is brighter than its surroundings (an inverted display)."""
    half = float(np.median(np.concatenate(priors)))
    inside = _sample(image, path[:, None, :] + np.array([-0.5, 0.0, 0.5])[None, :, None]
                     * half * normal[:, None, :])
    outside = _sample(image, path[:, None, :] + np.array([-2.5, 2.5])[None, :, None]
                      * half * normal[:, None, :])
    return float(np.median(inside)) > float(np.median(outside))


def _sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(image, [points[..., 1], points[..., 0]], order=1,
                                   mode="nearest")


def _one_side(image: np.ndarray, path: np.ndarray, outward: np.ndarray, prior: np.ndarray,
              settings: EdgeSettings) -> np.ndarray:
    h = settings.sample_step_px
    reach = settings.band_factor * prior + settings.band_margin_px
    pad = int(np.ceil(4 * settings.derivative_scale_px / h))  # room for the derivative filter
    t = np.arange(-settings.inward_px - pad * h, float(reach.max()) + (pad + 1) * h, h)
    profile = _sample(image, path[:, None, :] + t[None, :, None] * outward[:, None, :])
    scale = settings.derivative_scale_px / h
    first = ndimage.gaussian_filter1d(profile, scale, axis=1, order=1) / h
    second = ndimage.gaussian_filter1d(profile, scale, axis=1, order=2) / h ** 2
    strength = (first - settings.second_derivative_weight_px * second)[:, pad:-pad]
    t = t[pad:-pad]
    allowed = t[None, :] <= reach[:, None]
    positive = strength[allowed & (strength > 0)]
    norm = float(np.percentile(positive, 95)) if positive.size else 1.0
    relative = np.clip(strength / max(norm, 1e-12), -1.0, 1.5)
    beyond = np.clip(t[None, :] - prior[:, None], 0, None) / (0.5 * prior[:, None]
                                                              + settings.band_margin_px)
    cost = (-relative + settings.prior_weight * beyond ** 2
            + settings.outside_weight * _not_background(profile[:, pad:-pad], t, prior, reach,
                                                         settings))
    cost[~allowed] = _BLOCKED
    chosen = _min_cost_path(cost, max(1, int(round(settings.max_shift_px / h))))
    rows = np.arange(len(chosen))
    inner = np.clip(chosen, 1, len(t) - 2)
    a, b, c = (relative[rows, inner - 1], relative[rows, inner], relative[rows, inner + 1])
    curvature = a - 2 * b + c
    offset = np.where(curvature < 0, 0.5 * (a - c) / np.where(curvature < 0, curvature, -1),
                      0.0)
    distance = t[chosen] + np.clip(offset, -0.5, 0.5) * h * (chosen == inner)
    weak = relative[rows, chosen] < settings.weak_edge
    return np.where(weak, np.nan, distance)


def _not_background(profile: np.ndarray, t: np.ndarray, prior: np.ndarray, reach: np.ndarray,
                    settings: EdgeSettings) -> np.ndarray:
    """0 where the frame ``outside_px`` beyond a candidate edge is at the background's level, 1
    where it is as dark as the lumen: a wall has background outside it, while the edge of a
    vessel overlapping the lumen (darker inside the lumen) has lumen outside it."""
    centre = np.median(profile[:, np.abs(t) <= 1.0], axis=1)
    far = (t[None, :] >= prior[:, None]) & (t[None, :] <= reach[:, None])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with no far samples: below
        background = np.nanpercentile(np.where(far, profile, np.nan), 75, axis=1)
    background = np.where(far.any(axis=1), background, profile[:, -1])
    centre = ndimage.median_filter(centre, size=9, mode="nearest")
    background = ndimage.median_filter(background, size=9, mode="nearest")
    contrast = np.maximum(background - centre, 1e-6)
    shift = int(round(settings.outside_px / settings.sample_step_px))
    beyond = np.concatenate([profile[:, shift:], np.repeat(profile[:, -1:], shift, axis=1)],
                            axis=1)
    return np.clip((background[:, None] - beyond) / contrast[:, None], 0.0, 1.0)


def _min_cost_path(cost: np.ndarray, max_jump: int) -> np.ndarray:
    """Column per row of the cheapest top-to-bottom path moving at most ``max_jump`` columns
    between rows (dynamic programming, then backtracking)."""
    rows, cols = cost.shape
    total = cost[0].copy()
    came_from = np.zeros((rows, cols), dtype=np.int64)
    shifts = np.arange(-max_jump, max_jump + 1)
    index = np.arange(cols)
    for r in range(1, rows):
        candidates = np.full((len(shifts), cols), np.inf)
        for k, shift in enumerate(shifts):
            source = index + shift
            ok = (source >= 0) & (source < cols)
            candidates[k, ok] = total[source[ok]]
        best = np.argmin(candidates, axis=0)
        came_from[r] = index + shifts[best]
        total = cost[r] + candidates[best, index]
    chosen = np.empty(rows, dtype=np.int64)
    chosen[-1] = int(np.argmin(total))
    for r in range(rows - 1, 0, -1):
        chosen[r - 1] = came_from[r, chosen[r]]
    return chosen
