"""QCA read in pixels, for a frame without calibration: the same numbers under ``_px`` names.

``measure`` works in mm from a spacing in mm per pixel; given 1.0 it works in pixels, but its
names still say mm. Renaming them here, rather than reporting "1 mm per pixel", keeps a pixel
count from ever being read as millimetres by whatever reads the JSON. Ratios (% diameter
stenosis) need no calibration and keep their names.
"""

from __future__ import annotations

PIXEL_ONLY_NOTE = "no calibration: mm values not reported"


def in_pixels(report):
    """``report`` (dicts and lists, as ``QCAResult.to_json`` or the heads give them) with every
    ``*_mm`` key renamed ``*_px``, and ``mm_per_pixel`` left out."""
    if isinstance(report, dict):
        return {_px_name(key): in_pixels(value) for key, value in report.items()
                if key != "mm_per_pixel"}
    if isinstance(report, list):
        return [in_pixels(value) for value in report]
    return report


def _px_name(key):
    return key[:-3] + "_px" if isinstance(key, str) and key.endswith("_mm") else key
