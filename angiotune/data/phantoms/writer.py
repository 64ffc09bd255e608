"""Phantom outputs in the layouts core labs deliver: XA DICOM, NPY cines, masks, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RLELossless,
    XRayAngiographicImageStorage,
    generate_uid,
)

from angiotune.data.phantoms.render import View

BITS_STORED = 12
MAX_VALUE = 2**BITS_STORED - 1


def quantise(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> the 12-bit integers a detector stores."""
    return np.round(np.clip(frames, 0, 1) * MAX_VALUE).astype(np.uint16)


def write_npy_cine(path: Path, stored: np.ndarray) -> None:
    """frames x H x W float32 in [0, 1], holding exactly the values the DICOM stores."""
    np.save(path, stored.astype(np.float32) / MAX_VALUE)


def write_xa_dicom(path: Path, stored: np.ndarray, view: View, *, patient: dict[str, str],
                   frame_time_ms: float, uid_seed: str, compress: bool) -> None:
    """A multi-frame XA Image Storage file with the tags angiotune and QCA software read."""
    frames, rows, cols = stored.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = "XA"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = patient["sex"]
    ds.InstitutionName = patient["institution"]
    ds.StudyDate = patient["study_date"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PositionerPrimaryAngle = round(view.lao_deg, 1)  # DICOM: LAO positive
    ds.PositionerSecondaryAngle = round(view.cranial_deg, 1)  # cranial positive
    ds.ImagerPixelSpacing = [round(view.imager_pixel_spacing_mm, 6)] * 2
    ds.DistanceSourceToDetector = round(view.source_to_detector_mm, 2)
    ds.DistanceSourceToPatient = round(view.source_to_patient_mm, 2)
    ds.EstimatedRadiographicMagnificationFactor = round(view.magnification, 6)
    ds.FrameTime = round(frame_time_ms, 3)
    ds.CineRate = round(1000.0 / frame_time_ms)
    ds.FrameIncrementPointer = (0x0018, 0x1063)  # FrameTime
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    if compress:
        ds.compress(RLELossless, stored, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def write_mask(path: Path, mask: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, mask.astype(np.uint8))
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
