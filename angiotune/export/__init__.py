"""Standard exports for tools outside angiotune.

* ``angiotune.export.model``: a kept adapter merged into its base, as a Hugging Face folder that
  transformers loads without peft, with a model card.
* ``angiotune.export.coco``: predicted lesions as a COCO instance dataset (CVAT, FiftyOne).
* ``angiotune.export.dicom``: the overlay as a DICOM Secondary Capture and the measurements as a
  DICOM Structured Report, in the source study or a pseudonymous one (a PACS viewer).

The prediction exports are written while predicting (``PredictSettings.exports``): they need the
analysed frame, the mask and the source's identifiers, which the predictions record leaves out
on purpose.
"""

from __future__ import annotations

from pathlib import Path

PREDICTION_FORMATS = ("coco", "dicom")
# How the DICOM results name the patient and study: a pseudonym (the default: files that leave
# the site carry no identity) or the source file's own identifiers (the PACS files them with it).
DICOM_IDENTITIES = ("pseudonym", "keep")


def prediction_writers(out: Path, formats: tuple[str, ...], identity: str, salt: str) -> dict:
    """One writer per format asked for: ``add(lesion, source, row)`` writes or collects one
    lesion and returns the files written; ``close()`` finishes and returns any more."""
    writers: dict = {}
    if "coco" in formats:
        from angiotune.export.coco import CocoWriter

        writers["coco"] = CocoWriter(Path(out) / "coco")
    if "dicom" in formats:
        from angiotune.export.dicom import DicomWriter

        writers["dicom"] = DicomWriter(Path(out) / "dicom", identity, salt)
    return writers
