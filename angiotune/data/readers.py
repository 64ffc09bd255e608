"""Readers for cine frames (multi-frame DICOM, NPY, single PNG/JPEG frames), masks and QCA
contour JSON.

Each reader raises ``DataError`` naming the file; none returns half-read data. Frames come back as
float32 in [0, 1], whatever the storage, and only the requested frame of a cine is decoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from angiotune.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom", ""}
# Frames extracted from a cine (COCO datasets such as ARCADE): read as a cine of one frame.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
MAGNIFICATION_RANGE = (1.0, 3.0)


@dataclass(frozen=True)
class CineHeader:
    """What the index needs from a cine without decoding pixels. No patient fields."""

    frames: int
    height: int
    width: int
    transfer_syntax: str = "npy"
    lao_deg: float | None = None  # DICOM PositionerPrimaryAngle, LAO positive
    cranial_deg: float | None = None
    imager_pixel_spacing_mm: float | None = None  # at the detector
    magnification: float | None = None  # source-detector / source-patient distance
    pixel_spacing_mm: float | None = None  # PixelSpacing: already at the patient plane

    def vessel_spacing(self) -> tuple[float, str] | None:
        """mm per pixel at the vessel and where it came from, or None when the file cannot say.

        ImagerPixelSpacing is measured at the detector and is divided by the geometric
        magnification; PixelSpacing, where an XA file has it, is the system's own calibration
        at the patient and is used as it is (dividing it again would shrink every mm).
        """
        if self.imager_pixel_spacing_mm and self.magnification:
            return (self.imager_pixel_spacing_mm / self.magnification,
                    f"DICOM ImagerPixelSpacing / magnification ({self.magnification:.3f})")
        if self.pixel_spacing_mm:
            return self.pixel_spacing_mm, "DICOM PixelSpacing (the system's calibration)"
        return None

    @property
    def spacing_at_vessel_mm(self) -> float | None:
        spacing = self.vessel_spacing()
        return None if spacing is None else spacing[0]


def is_dicom_path(path: Path) -> bool:
    return path.suffix.lower() != ".npy" and not is_image_path(path)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def cine_format(path: Path) -> str:
    """How a cine is stored, for the index: dicom, npy, or the image format (png, jpeg, ...)."""
    if is_image_path(path):
        suffix = path.suffix.lower().lstrip(".")
        return {"jpg": "jpeg", "tif": "tiff"}.get(suffix, suffix)
    return "dicom" if is_dicom_path(path) else "npy"


def read_header(path: Path) -> CineHeader:
    if is_image_path(path):
        try:
            with Image.open(path) as image:  # the size only: the pixels stay undecoded
                width, height = image.size
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise DataError(f"not a readable image ({error})", file=str(path)) from None
        return CineHeader(frames=1, height=height, width=width, transfer_syntax=cine_format(path))
    return _dicom_header(path) if is_dicom_path(path) else _npy_header(path)


def read_frame(path: Path, index: int) -> np.ndarray:
    """Frame ``index`` of a cine as float32 H x W in [0, 1]; decodes that frame only."""
    if is_image_path(path):
        frame = _image_frame(path, index)
    else:
        frame = _dicom_frame(path, index) if is_dicom_path(path) else _npy_frame(path, index)
    if not np.isfinite(frame).all():
        raise DataError(f"frame {index} contains NaN or infinite values", file=str(path))
    return frame


def read_cine(path: Path) -> np.ndarray:
    """Every frame, frames x H x W float32: for comparison and benchmarks, not the hot path."""
    if is_image_path(path):
        return _image_frame(path, 0)[None]
    if not is_dicom_path(path):
        return np.array(_load_npy(path), dtype=np.float32)  # a copy: reads every frame
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"cannot decode pixel data ({error})", file=str(path)) from None
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
    return np.stack([_normalise(f, ds) for f in frames])


def _dicom_header(path: Path) -> CineHeader:
    return _header_from(_dicom_meta(path), path)


def _dicom_meta(path: Path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise DataError("not a DICOM file (no DICM preamble or file meta)", file=str(path)) \
            from None
    except Exception as error:  # noqa: BLE001 - truncated or garbled headers raise many types
        raise DataError(f"unreadable DICOM header ({type(error).__name__}: {error})",
                        file=str(path)) from None


def check_complete(path: Path, header: CineHeader) -> None:
    """Refuse a cine cut short (an interrupted copy) even when the analysed frame survived."""
    if not is_dicom_path(path):
        return  # np.load refuses an NPY file shorter than its header says; PIL a cut image
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
        element = ds.get_item("PixelData")
    except Exception as error:  # noqa: BLE001 - garbled files raise many types
        raise DataError(f"unreadable DICOM ({type(error).__name__}: {error})", file=str(path),
                        field="PixelData") from None
    if element is None:
        raise DataError("pixel data missing or truncated", file=str(path), field="PixelData")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = (header.height * header.width * header.frames
                    * int(ds.get("SamplesPerPixel", 1)) * int(ds.get("BitsAllocated", 8)) // 8)
        available = path.stat().st_size - (element.file_tell or 0)
        if available < expected:
            raise DataError(f"truncated: {header.frames} frames need {expected} bytes of pixel "
                            f"data, the file holds at most {available}", file=str(path),
                            field="PixelData")
    elif header.frames > 1:
        _dicom_frame(path, header.frames - 1)


def _header_from(ds, path: Path) -> CineHeader:
    try:
        return _parse_header(ds, path)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - odd tag values raise many types
        raise DataError(f"unusable DICOM header ({type(error).__name__}: {error})",
                        file=str(path)) from None


def _parse_header(ds, path: Path) -> CineHeader:
    for tag in ("Rows", "Columns"):
        if not isinstance(ds.get(tag), int) or ds.get(tag) <= 0:
            raise DataError(f"missing or invalid {tag}", file=str(path), field=tag)
    frames = _positive_int(ds.get("NumberOfFrames", 1), path, "NumberOfFrames")
    magnification = finite_number(ds.get("EstimatedRadiographicMagnificationFactor"))
    sdd = finite_number(ds.get("DistanceSourceToDetector"))
    sod = finite_number(ds.get("DistanceSourceToPatient"))
    if sdd and sod and sdd > 0 and sod > 0:
        magnification = sdd / sod
    if magnification is not None and not MAGNIFICATION_RANGE[0] <= magnification \
            <= MAGNIFICATION_RANGE[1]:
        magnification = None  # a C-arm magnifies 1.1-2x: anything else is a broken tag
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return CineHeader(frames=frames, height=ds.Rows, width=ds.Columns,
                      transfer_syntax=str(syntax.name if syntax else "unknown"),
                      lao_deg=finite_number(ds.get("PositionerPrimaryAngle")),
                      cranial_deg=finite_number(ds.get("PositionerSecondaryAngle")),
                      imager_pixel_spacing_mm=_spacing(ds.get("ImagerPixelSpacing")),
                      magnification=magnification,
                      pixel_spacing_mm=_spacing(ds.get("PixelSpacing")))


def _dicom_frame(path: Path, index: int) -> np.ndarray:
    ds = _dicom_meta(path)
    header = _header_from(ds, path)
    if not 0 <= index < header.frames:
        raise DataError(f"frame {index} out of range: the cine has {header.frames} frames",
                        file=str(path), field="frame_index")
    try:
        pixels = pydicom.pixels.pixel_array(path, index=index)
    except Exception as error:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise DataError(f"cannot decode frame {index} ({type(error).__name__}: {error})",
                        file=str(path), field="PixelData") from None
    return _normalise(pixels, ds)


def _normalise(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values -> [0, 1] by the stored bit depth; MONOCHROME1 inverted; colour to grey."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    scaled = (pixels - low) / float(high - low)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _image_pixels(path: Path) -> np.ndarray:
    """A PNG/JPEG/TIFF frame as stored (grey, 8 or 16 bit); colour is turned to grey."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(image, dtype=np.int32)
            if image.mode == "F":
                return np.asarray(image, dtype=np.float32)
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"not a readable image ({error})", file=str(path)) from None


def _image_frame(path: Path, index: int) -> np.ndarray:
    if index != 0:
        raise DataError(f"frame {index} out of range: an image file is a cine of one frame",
                        file=str(path), field="frame_index")
    pixels = _image_pixels(path)
    if pixels.dtype == np.uint8:
        return (pixels / np.float32(255)).astype(np.float32)
    if pixels.dtype == np.int32:  # 16-bit grey
        return (np.clip(pixels, 0, 65535) / np.float32(65535)).astype(np.float32)
    if pixels.min() < -1e-6 or pixels.max() > 1 + 1e-6:
        raise DataError(f"floating-point image with values outside 0..1 "
                        f"({pixels.min():.3g}..{pixels.max():.3g})", file=str(path))
    return pixels.astype(np.float32)


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"not a readable NPY array ({error})", file=str(path)) from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.dtype.kind not in "fiu":
        raise DataError(f"expected frames x H x W numbers, got shape {array.shape} "
                        f"dtype {array.dtype}", file=str(path))
    return array


def _npy_header(path: Path) -> CineHeader:
    frames, height, width = _load_npy(path).shape
    return CineHeader(frames=frames, height=height, width=width)


def _npy_frame(path: Path, index: int) -> np.ndarray:
    cine = _load_npy(path)
    if not 0 <= index < cine.shape[0]:
        raise DataError(f"frame {index} out of range: the cine has {cine.shape[0]} frames",
                        file=str(path), field="frame_index")
    frame = np.asarray(cine[index], dtype=np.float32)
    if cine.dtype.kind in "iu":
        frame /= float(np.iinfo(cine.dtype).max)
    if np.isfinite(frame).all() and (frame.min() < -1e-6 or frame.max() > 1 + 1e-6):
        raise DataError(f"frame {index} has values outside 0..1 "
                        f"({frame.min():.3g}..{frame.max():.3g})", file=str(path))
    return frame


def read_mask(path: Path) -> np.ndarray:
    """A binary mask from PNG (any non-zero pixel) or NPY."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"not a readable NPY mask ({error})", file=str(path)) from None
    else:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L"))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise DataError(f"not a readable image mask ({error})", file=str(path)) from None
    array = np.squeeze(array)
    if array.ndim != 2:
        raise DataError(f"mask must be 2D, got shape {array.shape}", file=str(path))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError("mask contains NaN", file=str(path))
    return array > 0


def read_contour(path: Path) -> dict:
    """Contour JSON as exported by QCA software; the structure is checked by the index
    (the fields it reads: docs/contour_schema.md)."""
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A UTF-8 JSON file whose top level is an object (contour JSON, COCO annotations)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"not valid UTF-8 JSON ({error})", file=str(path)) from None
    if not isinstance(payload, dict):
        raise DataError("expected a JSON object at the top level", file=str(path))
    return payload


def _spacing(value) -> float | None:
    """Row spacing of a (row, column) spacing tag; None unless positive and finite."""
    if value is not None and not isinstance(value, (list, tuple, MultiValue)):
        value = [value]  # written with one value instead of row and column spacing
    spacing = finite_number(value[0]) if value else None
    return spacing if spacing is not None and spacing > 0 else None


def finite_number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _positive_int(value, path: Path, tag: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DataError(f"invalid {tag} {value!r}", file=str(path), field=tag) from None
    if number <= 0:
        raise DataError(f"invalid {tag} {number}", file=str(path), field=tag)
    return number
