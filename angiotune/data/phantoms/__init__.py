"""Synthetic coronary angiography with exact ground truth (phantoms), for tests and demos."""

from angiotune.data.phantoms.generate import PhantomSettings, PhantomSummary, generate_phantoms

__all__ = ["PhantomSettings", "PhantomSummary", "generate_phantoms"]
