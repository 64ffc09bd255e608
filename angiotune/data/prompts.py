"""Text prompts for the text_box mode, built from the index: the lesion and a hard negative."""

from __future__ import annotations

import numpy as np

from angiotune.taxonomies import load_taxonomy

# Something every angiogram shows that is not a stenosis, for lesions no segment is named for.
NO_SEGMENT_NEGATIVE = "guiding catheter"


def lesion_prompt(segment_name: str) -> str:
    return f"{segment_name} stenosis"


def neighbour_prompt(segment_code: str, taxonomy: str, rng: np.random.Generator) -> str:
    """A hard negative: another segment of the same vessel (or, failing that, any other), so the
    presence head learns the segment, not merely that some text was given."""
    table = load_taxonomy(taxonomy)
    own = table.segments.get(segment_code)
    if own is None:  # a lesion of no named segment (ARCADE stenosis): any segment may hold it
        return NO_SEGMENT_NEGATIVE
    same_vessel = [c for c in table.codes_of(own.vessel) if c != segment_code]
    pool = same_vessel or [c for c in table.segments if c != segment_code]
    return lesion_prompt(table.segments[str(rng.choice(pool))].name)
