"""Train/validation/test splits by patient: deterministic, stratified by vessel, leak-free.

Every lesion of a patient goes to the split of that patient, so no patient can be in two splits
whatever the rows look like. Patients are stratified by their most frequent vessel and ordered
within a stratum by a seeded hash of their key, then cut by the fractions.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

from angiotune.errors import ConfigError

SPLITS = ("train", "val", "test")


def assign_splits(patient_keys: Sequence[str], vessels: Sequence[str],
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> list[str]:
    """One split name per row, decided per patient."""
    if len(patient_keys) != len(vessels):
        raise ValueError("patient_keys and vessels must have the same length")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    by_patient: dict[str, Counter] = defaultdict(Counter)
    for key, vessel in zip(patient_keys, vessels, strict=True):
        by_patient[key][vessel] += 1
    strata: dict[str, list[str]] = defaultdict(list)
    for key, counts in by_patient.items():
        top = max(counts.items(), key=lambda item: (item[1], item[0]))[0]
        strata[top].append(key)
    split_of: dict[str, str] = {}
    train_cut, val_cut = fractions[0], fractions[0] + fractions[1]
    for stratum in strata.values():
        stratum.sort(key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
        for position, key in enumerate(stratum):
            quantile = (position + 0.5) / len(stratum)
            split_of[key] = ("train" if quantile < train_cut else
                             "val" if quantile < val_cut else "test")
    return [split_of[key] for key in patient_keys]
