"""Scoring kept adapters on their index's test split, never used for selection: segmentation
and the heads against the zero-shot base and trivial baselines (``test_split``), and lesion
proposals as a detector (``detection``)."""
