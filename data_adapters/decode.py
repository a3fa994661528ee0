"""Decoding rules shared by every layout: one function per file kind, one output convention.

Every decoder returns a `Decoded`: float32 pixels in [0, 1] shaped (C, H, W) with C = 1 for grayscale
(grayscale stays one channel until a model asks for three), plus what was seen about the file. Errors are
`DecodeError`, whose message is one line a user can act on.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .records import one_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


class DecodeError(Exception):
    """A file that cannot be read as an image; the message is one line naming the file.

    `kind` is a short, path-free label (what data.json may keep; the message may hold paths and names).
    """

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class Decoded:
    pixels: np.ndarray  # float32 (C, H, W) in [0, 1]
    mode: str  # e.g. "L", "RGB", "I;16", "MONOCHROME1"
    bit_depth: int
    original_size: tuple[int, int]  # (width, height) as stored
    patient_id: str | None = None  # raw DICOM PatientID: hash it before it goes anywhere
    synthetic: bool = False  # the PNG carries rareaug's marker: an image rareaug generated, never real data


SYNTHETIC_MARKER = "rareaug:synthetic"  # PNG text key that rareaug.generate writes into every image it makes


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


def decode(path: Path, frame: int = 0) -> Decoded:
    """Decode any supported file (picture formats through Pillow, DICOM through pydicom).

    `frame` picks the frame of a multi-frame DICOM; files with a single frame (pictures too) have only that one.
    """
    if not path.is_file():
        raise DecodeError(f"{path}: not a file", "missing")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes); remove it or replace it with the real image", "empty file")
    if is_dicom_file(path):
        return decode_dicom(path, frame=frame)
    return decode_picture(path)


# --- pictures (PNG, JPEG, TIFF, BMP) ---------------------------------------------------------------

def decode_picture(path: Path) -> Decoded:
    try:
        with Image.open(path) as image:
            image.load()
            original_size = image.size
            mode = image.mode
            synthetic = image.info.get(SYNTHETIC_MARKER) == "true"
            image = ImageOps.exif_transpose(image)  # a phone photo is shown upright, so train on it upright
            pixels, bit_depth = _picture_to_array(image)
    except Image.DecompressionBombError as error:
        raise DecodeError(f"{path}: image too large to decode safely ({one_line(error)})", "too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DecodeError(f"{path}: not a readable image ({one_line(error)}); re-export or remove it",
                          "unreadable image") from None
    return Decoded(pixels=pixels, mode=mode, bit_depth=bit_depth, original_size=original_size, synthetic=synthetic)


def _picture_to_array(image: Image.Image) -> tuple[np.ndarray, int]:
    """Scale by the format's own range, never by the image's min/max, so intensities stay comparable."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)[None], 1
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.int64)
        # Pillow opens 16-bit PNGs as "I" or "I;16"; both hold values up to 65535 at most.
        bits = 16 if array.size == 0 or (array.min() >= 0 and array.max() <= 65535) else 32
        if bits == 32:
            low, high = float(array.min()), float(array.max())
            return (((array - low) / max(high - low, 1.0)).astype(np.float32))[None], 32
        return (array.astype(np.float32) / 65535.0)[None], 16
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        return np.clip((array - low) / max(high - low, 1e-12), 0, 1)[None], 32
    # 8-bit kinds: palette, alpha, CMYK (Pillow inverts Adobe CMYK JPEGs correctly), YCbCr, RGB, L.
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    gray = mode in ("L", "LA", "La") or (mode in ("P", "PA") and _is_gray_palette(image))
    target = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    array = np.asarray(image.convert(target), dtype=np.float32) / 255.0
    if has_alpha:
        return _composite_on_black(array), 8
    return (array[None] if gray else np.moveaxis(array, -1, 0)).astype(np.float32), 8


def _is_gray_palette(image: Image.Image) -> bool:
    palette = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.all(palette[..., 0] == palette[..., 1]) and np.all(palette[..., 1] == palette[..., 2]))


def _composite_on_black(array: np.ndarray) -> np.ndarray:
    """Transparent pixels become black (zero), the same value padding uses, instead of hidden colours."""
    color, alpha = array[..., :-1], array[..., -1:]
    return np.moveaxis(color * alpha, -1, 0).astype(np.float32)


# --- DICOM -----------------------------------------------------------------------------------------

def decode_dicom(path: Path, frame: int = 0) -> Decoded:
    """Modality LUT (rescale) -> VOI LUT or window -> MONOCHROME1 inversion, in the standard's order."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise DecodeError(f"{path}: not a readable DICOM file ({one_line(error)})", "unreadable DICOM") from None
    if "PixelData" not in ds:
        raise DecodeError(f"{path}: DICOM file without pixel data (a report or structured document?); remove it",
                          "DICOM without pixel data")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame = 0 if n_frames == 1 and frame > 0 else frame
        if not 0 <= frame < n_frames:
            raise DecodeError(f"{path}: has {n_frames} frame(s), frame {frame} was asked for", "no such frame")
        raw = ds.pixel_array if n_frames == 1 else ds.pixel_array[frame]
    except DecodeError:
        raise
    except Exception as error:  # pydicom raises RuntimeError/NotImplementedError/ValueError variants
        raise DecodeError(_dicom_pixel_error(path, ds, error), "DICOM pixel data not decodable here") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits_stored = int(ds.get("BitsStored", raw.dtype.itemsize * 8))
    height, width = raw.shape[:2]
    patient_id = str(ds.get("PatientID", "") or "").strip() or None

    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = apply_color_lut(raw, ds).astype(np.float32) / float(2**lut_bits - 1)
        return Decoded(np.moveaxis(np.clip(rgb, 0, 1), -1, 0).astype(np.float32), photometric, lut_bits,
                       (width, height), patient_id)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # Colour DICOM (secondary captures, photos): pydicom's pixel_array already converts YBR to RGB.
        scale = float(2**bits_stored - 1)
        pixels = np.moveaxis(np.clip(raw.astype(np.float32) / scale, 0, 1), -1, 0)
        return Decoded(pixels.astype(np.float32), photometric, bits_stored, (width, height), patient_id)

    values = apply_modality_lut(raw, ds)  # integers stay integers: a VOI LUT is indexed by them
    if _has_voi(ds):
        windowed = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        low, high = _voi_output_range(ds)
    else:
        # No window in the file: a robust stretch, so a few hot pixels do not darken the whole image.
        windowed = values.astype(np.float64)
        low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    # Signed span: with a negative RescaleSlope pydicom's window output runs from a larger y_min to a smaller
    # y_max, and low input values still map to y_min; dividing by the signed span keeps them dark.
    span = high - low
    pixels = np.clip((windowed - low) / (span if abs(span) > 1e-12 else 1e-12), 0.0, 1.0)
    if photometric == "MONOCHROME1":  # MONOCHROME1 shows its minimum as white: invert, last.
        pixels = 1.0 - pixels
    return Decoded(pixels[None].astype(np.float32), photometric, bits_stored, (width, height), patient_id)


def _has_voi(ds) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _voi_output_range(ds) -> tuple[float, float]:
    """The range apply_voi_lut maps into (PS3.3 C.11.2), so windowed values scale to [0, 1] exactly."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _dicom_pixel_error(path: Path, ds, error: Exception) -> str:
    """Name the transfer syntax and the package that would decode it, taken from pydicom's own message."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
    needs = re.findall(r"requires (.+)", str(error))
    if needs:
        options = " or ".join(sorted(set(need.strip() for need in needs)))
        return (
            f"{path}: cannot decode DICOM transfer syntax '{syntax_name}' here; "
            f"install a decoder: {options} (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"
        )
    if syntax is not None and getattr(syntax, "is_compressed", False):
        # pydicom named no package (e.g. Pillow tried 12-bit JPEG and gave up): name the decoders for the family.
        packages = next((names for prefix, names in _DECODERS if str(syntax).startswith(prefix)), _ANY_DECODER)
        return (f"{path}: cannot decode DICOM transfer syntax '{syntax_name}' here ({one_line(error)[:120]}); "
                f"install a decoder: pip install {packages}")
    return f"{path}: cannot decode DICOM pixel data ({syntax_name}): {one_line(error)}"


# Which pip packages decode which compressed transfer syntaxes (pydicom's pixel-data handler table).
_DECODERS = (
    ("1.2.840.10008.1.2.4.8", "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)"),  # JPEG-LS
    ("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),  # JPEG 2000
    ("1.2.840.10008.1.2.4.", "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),  # JPEG baseline, 12-bit, lossless
    ("1.2.840.10008.1.2.5", "pylibjpeg pylibjpeg-rle"),  # RLE
)
_ANY_DECODER = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def load_mask(path: Path) -> np.ndarray:
    """Masks are any non-zero pixel; returned as bool (H, W)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(ImageOps.exif_transpose(image).convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DecodeError(f"{path}: mask not readable ({one_line(error)})", "unreadable mask") from None
    return array > 0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The defect's bounding box (x0, y0, x1, y1), exclusive ends; None for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
