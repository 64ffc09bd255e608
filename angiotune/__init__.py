"""angiotune: Ray-distributed search for SAM 3 LoRA adapters on coronary angiograms."""

__version__ = "0.1.0"
