"""DICOM results a PACS files into a study: the overlay as a Secondary Capture, and the QCA
measurements as a DICOM Structured Report (TID 1500 measurement report, Enhanced SR) that cites
the Secondary Capture.

Identity, the user's choice:

* ``pseudonym`` (the default): the patient is named by the pseudonymous key (the index's
  ``patient_key`` for an index row, else the salted key of the file's PatientID) and the study by
  a UID derived from the salt and the source's StudyInstanceUID, so that every export of one
  study lands in one pseudonymous study. Nothing else of the source's patient or study modules
  is written. Results of one study can then leave the site and still group together.
* ``keep``: the source file's patient and study identifiers are copied, so the PACS files the
  results into the study they came from; the report also cites the analysed frame of the
  source image. Only DICOM inputs have identifiers: NPY and image inputs get pseudonymous ones.

The derived objects always get new series and instance UIDs (one Secondary Capture series and
one report series per study and run).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from highdicom.sc import SCImage
from highdicom.sr import (
    AlgorithmIdentification,
    DeviceObserverIdentifyingAttributes,
    EnhancedSR,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from angiotune import __version__
from angiotune.data.pseudonym import patient_key
from angiotune.data.readers import is_dicom_path
from angiotune.errors import ConfigError
from angiotune.export import DICOM_IDENTITIES

log = logging.getLogger(__name__)

MANUFACTURER = "angiotune"
SC_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002  # after the acquisitions in a viewer's list
RESEARCH = "research output, not for diagnosis"
# The source's patient and study attributes (DICOM keyword -> highdicom argument): copied in
# ``keep`` mode, replaced or left out in ``pseudonym`` mode.
STUDY_ATTRIBUTES = {
    "PatientID": "patient_id", "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex",
    "StudyInstanceUID": "study_instance_uid", "StudyID": "study_id",
    "AccessionNumber": "accession_number", "StudyDate": "study_date", "StudyTime": "study_time",
    "ReferringPhysicianName": "referring_physician_name"}
# The same observer for every report of this software (a UID derived from its name).
DEVICE_UID = generate_uid(entropy_srcs=["angiotune measurement device"])

# Where the lesion is (the report's finding site). Vessels: DICOM CID 3015 (coronary arteries);
# CASS segments: CID 3014 (coronary artery segments, BARI/CASS numbering). Segments whose CASS
# meaning has no exact code there (10 acute marginal, 17 LAD septal, 19 mid/distal circumflex)
# are reported at their vessel.
VESSEL_SITES = {"RCA": codes.SCT.RightCoronaryArtery,
                "LAD": codes.SCT.LeftAnteriorDescendingCoronaryArtery,
                "LCX": codes.SCT.CircumflexCoronaryArtery, "LM": codes.SCT.LeftMainCoronaryArtery,
                "RAMUS": codes.SCT.IntermediateArteryRamus}
CASS_SITES = {
    "1": codes.SCT.ProximalRightCoronaryArtery, "2": codes.SCT.MidRightCoronaryArtery,
    "3": codes.SCT.DistalRightCoronaryArtery,
    "4": codes.SCT.PosteriorDescendingRightCoronaryArtery,
    "5": codes.SCT.PosterolateralBranchOfRightCoronaryArtery,
    "6": codes.SCT._1stRightPosterolateralCoronaryArtery,
    "7": codes.SCT._2ndRightPosterolateralCoronaryArtery,
    "8": codes.SCT._3rdRightPosterolateralCoronaryArtery,
    "9": codes.BARI.PosteriorDescendingSeptalPerforators,
    "11": codes.SCT.LeftMainCoronaryArtery,
    "12": codes.SCT.ProximalLeftAnteriorDescendingCoronaryArtery,
    "13": codes.SCT.MidLeftAnteriorDescendingCoronaryArtery,
    "14": codes.SCT.DistalLeftAnteriorDescendingCoronaryArtery,
    "15": codes.SCT._1stDiagonalCoronaryArtery, "16": codes.SCT._2ndDiagonalCoronaryArtery,
    "18": codes.SCT.ProximalCircumflexCoronaryArtery,
    "20": codes.SCT._1stMarginalCoronaryArtery, "21": codes.SCT._2ndMarginalCoronaryArtery,
    "22": codes.SCT._3rdMarginalCoronaryArtery,
    "23": codes.SCT.AVGrooveContinuationOfCircumflexArtery,
    "24": codes.SCT._1stLeftPosterolateralCoronaryArtery,
    "25": codes.SCT._2ndLeftPosterolateralCoronaryArtery,
    "26": codes.SCT._3rdLeftPosterolateralCoronaryArtery,
    "27": codes.SCT.LeftPosteriorDescendingCircumflexCoronaryArtery,
    "28": codes.SCT.IntermediateArteryRamus, "29": codes.SCT._3rdDiagonalCoronaryArtery}
# The QCA numbers (report key without the unit) as TID 1419 measurements: concept, unit,
# whether it is a length (left out of an uncalibrated report: no millimetres, and UCUM has no
# pixel), and its modifier (derivation, or the reference method of CID 3465).
QCA_MEASUREMENTS = (
    ("MLD", codes.SCT.VesselLumenDiameter, codes.UCUM.Millimeter, True,
     {"derivation": codes.SCT.Minimum}),
    ("interpolated_RVD", codes.SCT.VesselLumenDiameter, codes.UCUM.Millimeter, True,
     {"method": codes.DCM.InterpolatedLocalReference}),
    ("diameter_stenosis_pct", codes.SCT.LumenDiameterStenosis, codes.UCUM.Percent, False, {}),
    ("lesion_length", codes.SCT.StenoticLesionLength, codes.UCUM.Millimeter, True, {}),
)


@dataclass(frozen=True)
class StudyIdentity:
    """The patient and study the results are filed under (highdicom's keyword arguments), and
    the source image's header when its identifiers were kept (the report then cites it)."""

    attributes: dict[str, str | None]
    source: pydicom.Dataset | None = None

    @property
    def study_uid(self) -> str:
        return str(self.attributes["study_instance_uid"])


def derived_uid(salt: str, *parts: str) -> str:
    """A UID that the same salt and parts always give, and from which neither can be
    recovered (pydicom's deterministic UIDs: its root and a SHA-512 of the sources)."""
    return str(generate_uid(entropy_srcs=[salt, *parts]))


def study_identity(source: Path, row: dict | None, input_key: str, mode: str,
                   salt: str) -> StudyIdentity:
    """The identity to write for a lesion of ``source`` (an index ``row`` when it came from
    one; ``input_key``: its pseudonymous key in the predictions)."""
    if mode not in DICOM_IDENTITIES:
        raise ConfigError(f"dicom identity must be one of {DICOM_IDENTITIES}, got {mode!r}")
    header = _header(source)
    fallback_study = str(Path(source).resolve())
    if mode == "keep" and header is not None:
        kept = {argument: _text(header.get(keyword))
                for keyword, argument in STUDY_ATTRIBUTES.items()}
        kept["study_instance_uid"] = kept["study_instance_uid"] or derived_uid(
            salt, "study", fallback_study)
        return StudyIdentity(kept, header)
    if mode == "keep":
        log.info("angiotune: %s is not DICOM, so it has no identifiers to keep; its DICOM "
                 "results are pseudonymous", input_key)
    raw_id = _text(header.get("PatientID")) if header is not None else None
    key = ((row or {}).get("patient_key") or (patient_key(raw_id, salt) if raw_id else None)
           or input_key)
    study = (_text(header.get("StudyInstanceUID")) if header is not None else None) \
        or fallback_study
    # A trailing caret: the key is the family-name component (PN syntax), not a name to split.
    return StudyIdentity({"patient_id": key, "patient_name": f"{key}^",
                          "study_instance_uid": derived_uid(salt, "study", study)})


def _header(path: Path) -> pydicom.Dataset | None:
    if not is_dicom_path(Path(path)):
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError):
        return None


def _text(value) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def secondary_capture(lesion, identity: StudyIdentity, series_uid: str,
                      instance_number: int) -> SCImage:
    """The lesion's overlay picture as an RGB Secondary Capture image."""
    from angiotune.predict.overlay import draw_overlay

    pixels = np.asarray(draw_overlay(lesion).convert("RGB"))
    image = SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"),
        series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=MANUFACTURER, **identity.attributes)
    # A layout of panels and text has no patient orientation: empty, as DICOM allows (type 2);
    # highdicom asks for one, so the placeholder above is replaced.
    image.PatientOrientation = ""
    image.SeriesDescription = f"angiotune lesion overlays ({RESEARCH})"
    image.DerivationDescription = "QCA overlay of an analysed angiography frame"
    return image


def measurement_report(lesion, capture: SCImage, identity: StudyIdentity, series_uid: str,
                       instance_number: int) -> EnhancedSR | None:
    """The lesion's QCA numbers as a TID 1500 measurement report citing ``capture`` (and the
    source frame when identities are kept); None when the QCA measured nothing."""
    measurements = qca_measurements(lesion.report)
    if not measurements:
        return None
    sources = [SourceImageForMeasurementGroup.from_source_image(capture)]
    evidence = [capture]
    if identity.source is not None and "SOPInstanceUID" in identity.source:
        frames = int(identity.source.get("NumberOfFrames", 1) or 1)
        sources.append(SourceImageForMeasurementGroup.from_source_image(
            identity.source, [lesion.report["input"]["frame"] + 1] if frames > 1 else None))
        evidence.append(identity.source)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=lesion.key),
        finding_type=codes.SCT.Stenosis, finding_sites=[FindingSite(finding_site(lesion.report))],
        algorithm_id=_algorithm(lesion.report), measurements=measurements,
        source_images=sources)
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name="angiotune", manufacturer_name=MANUFACTURER,
            model_name=f"angiotune {__version__}"))
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.CoronaryArteriography, imaging_measurements=[group])
    report = EnhancedSR(
        evidence=evidence, content=content[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=instance_number, manufacturer=MANUFACTURER, is_complete=True)
    report.SeriesDescription = f"angiotune QCA ({RESEARCH})"
    return report


def qca_measurements(report: dict) -> list[Measurement]:
    """The QCA numbers of a lesion report (``qca``), in millimetres where calibrated; the
    stenosis alone (a ratio) where it was measured in pixels."""
    qca, unit = report.get("qca") or {}, report.get("units", "mm")
    found = []
    for key, name, code_unit, length, modifier in QCA_MEASUREMENTS:
        if length and unit != "mm":
            continue
        value = qca.get(f"{key}_{unit}" if length else key)
        if isinstance(value, (int, float)):
            found.append(Measurement(name=name, value=float(value), unit=code_unit, **modifier))
    return found


def finding_site(report: dict):
    """The CASS segment's code when the heads named one on the lesion's vessel, else the
    vessel's (the core lab's, else the adapter's), else a coronary artery."""
    from angiotune.taxonomies import load_taxonomy
    from angiotune.taxonomies.views import load_views

    adapter_for = load_views().adapter_for
    vessel = (report.get("core_lab") or {}).get("vessel") or report["adapter"]["vessel"]
    heads = report.get("heads") or {}
    segment = load_taxonomy("CASS").segments.get(str(heads.get("cass_segment")))
    if (heads.get("taxonomy") == "CASS" and segment is not None
            and str(heads["cass_segment"]) in CASS_SITES
            and adapter_for.get(segment.vessel, segment.vessel)
            == adapter_for.get(vessel, vessel)):
        return CASS_SITES[str(heads["cass_segment"])]
    return VESSEL_SITES.get(vessel, codes.SCT.CoronaryArtery)


def _algorithm(report: dict) -> AlgorithmIdentification:
    adapter = report["adapter"]
    return AlgorithmIdentification(
        name="angiotune", version=__version__,
        parameters=[f"{adapter['vessel']} adapter, stage {adapter['stage']}, "
                    f"{adapter['strategy']}", f"search {adapter['search']}, trial "
                    f"{adapter['trial_id']}", f"QCA edges from the {report['qca'].get('edges')}"])


class DicomWriter:
    """Writes each lesion's Secondary Capture and report into ``folder`` as
    ``<lesion key>_SC.dcm`` and ``<lesion key>_SR.dcm``."""

    def __init__(self, folder: Path, identity: str, salt: str) -> None:
        if identity not in DICOM_IDENTITIES:
            raise ConfigError(f"dicom identity must be one of {DICOM_IDENTITIES}, got "
                              f"{identity!r}")
        self.folder, self.identity, self.salt = Path(folder), identity, salt
        self.run = uuid.uuid4().hex  # new series each run
        self.numbers: dict[str, int] = {}

    def add(self, lesion, source: Path, row: dict | None = None) -> list[Path]:
        identity = study_identity(source, row, lesion.report["input"]["key"], self.identity,
                                  self.salt)
        number = self.numbers[identity.study_uid] = self.numbers.get(identity.study_uid, 0) + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        capture = secondary_capture(lesion, identity, self._series(identity, "SC"), number)
        written = [self._save(capture, f"{lesion.key}_SC.dcm")]
        report = measurement_report(lesion, capture, identity, self._series(identity, "SR"),
                                    number)
        if report is not None:
            written.append(self._save(report, f"{lesion.key}_SR.dcm"))
        return written

    def close(self) -> list[Path]:
        return []

    def _series(self, identity: StudyIdentity, kind: str) -> str:
        return derived_uid(self.run, identity.study_uid, kind)

    def _save(self, dataset: pydicom.Dataset, name: str) -> Path:
        path = self.folder / name
        dataset.save_as(path, enforce_file_format=True)
        return path
