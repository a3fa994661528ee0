"""Tests for data_adapters.decode: every file kind lands as float32 (C, H, W) in [0, 1], the right way round."""
from __future__ import annotations

import functools
import importlib.util
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from data_adapters.decode import (
    Decoded,
    DecodeError,
    decode,
    is_dicom_file,
    is_image_file,
    load_mask,
    mask_box,
)

EXIF_ORIENTATION = 0x0112


# --- helpers ---------------------------------------------------------------------------------------


def _testdata(name: str) -> Path:
    """Resolve a pydicom / pydicom-data test file, so tests use real scanner output instead of fakes."""
    return Path(get_testdata_file(name))


@functools.lru_cache(maxsize=None)
def _decoded(name: str, frame: int = 0) -> Decoded:
    """Decode a test DICOM once per session, because the radiographs are several megapixels each."""
    return decode(_testdata(name), frame=frame)


@functools.lru_cache(maxsize=None)
def _dataset(name: str) -> pydicom.Dataset:
    """Read a test DICOM once per session for the independent pydicom expectation."""
    return pydicom.dcmread(_testdata(name))


def _error_message(path: Path, frame: int = 0) -> str:
    """Decode a file that must fail and return the message, checking the one-line contract on the way."""
    with pytest.raises(DecodeError) as excinfo:
        decode(path, frame=frame)
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def _expected_voi(ds: pydicom.Dataset) -> np.ndarray:
    """Independent modality LUT -> window -> scale-by-output-range -> MONOCHROME1 inversion, as PS3.3 orders it."""
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        low, high = 0.0, 2.0**bits - 1
    else:
        low, high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    expected = np.clip((windowed - low) / (high - low), 0.0, 1.0)
    return 1.0 - expected if ds.PhotometricInterpretation == "MONOCHROME1" else expected


def _region_mean(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    """Mean over a box given as fractions of the image, so anatomy checks do not depend on resolution."""
    height, width = pixels.shape
    row_slice = slice(int(rows[0] * height), int(rows[1] * height))
    col_slice = slice(int(cols[0] * width), int(cols[1] * width))
    return float(pixels[row_slice, col_slice].mean())


def _assert_float_chw(decoded: Decoded, channels: int, height: int, width: int) -> None:
    """The one output convention every caller relies on."""
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.shape == (channels, height, width)
    assert float(decoded.pixels.min()) >= 0.0 and float(decoded.pixels.max()) <= 1.0


def _save(image: Image.Image, path: Path, **params) -> Path:
    """Write a picture and hand back its path, to keep each test to its arrange/act/assert."""
    image.save(path, **params)
    return path


# --- DICOM: monochrome radiographs -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "bits"), [("RG1_UNCI.dcm", 15), ("RG3_UNCI.dcm", 10)])
def test_radiograph_metadata(name: str, bits: int) -> None:
    """Bit depth, photometric mode and (width, height) come from the DICOM header, not from guesses."""
    ds = _dataset(name)
    decoded = _decoded(name)
    _assert_float_chw(decoded, 1, int(ds.Rows), int(ds.Columns))
    assert decoded.bit_depth == bits
    assert decoded.mode == "MONOCHROME1"
    assert decoded.original_size == (int(ds.Columns), int(ds.Rows))


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG3_UNCI.dcm"])
def test_monochrome1_matches_independent_pydicom_pipeline(name: str) -> None:
    """MONOCHROME1 is windowed by the file's own window, scaled by the window output range, then inverted."""
    np.testing.assert_allclose(_decoded(name).pixels[0], _expected_voi(_dataset(name)), atol=1e-6)


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG3_UNCI.dcm"])
def test_monochrome1_inversion_is_applied_last(name: str) -> None:
    """The highest stored value is the darkest output and the lowest stored value the brightest."""
    raw = _dataset(name).pixel_array
    pixels = _decoded(name).pixels[0]
    at_raw_max = pixels[raw == raw.max()]
    at_raw_min = pixels[raw == raw.min()]
    assert float(at_raw_max.max()) == pytest.approx(float(pixels.min()), abs=1e-6)
    assert float(at_raw_min.min()) == pytest.approx(float(pixels.max()), abs=1e-6)
    assert float(at_raw_max.max()) < 0.2 < 0.9 < float(at_raw_min.min())


def test_chest_lungs_darker_than_spine() -> None:
    """On a chest film shown the right way round, air-filled lungs are darker than the mediastinum."""
    pixels = _decoded("RG1_UNCI.dcm").pixels[0]
    spine = _region_mean(pixels, (0.25, 0.45), (0.46, 0.54))
    for lung_cols in [(0.15, 0.30), (0.65, 0.80)]:
        assert _region_mean(pixels, (0.25, 0.45), lung_cols) < spine - 0.2


def test_leg_air_darker_than_bone() -> None:
    """On the leg film, direct-exposure air is near black and the tibia is bright."""
    pixels = _decoded("RG3_UNCI.dcm").pixels[0]
    air = _region_mean(pixels, (0.2, 0.4), (0.28, 0.34))
    tibia = _region_mean(pixels, (0.2, 0.4), (0.50, 0.54))
    assert air < 0.15
    assert tibia > 0.5


# --- DICOM: MONOCHROME2 and colour ----------------------------------------------------------------


def test_ct_without_window_uses_robust_percentile_stretch() -> None:
    """Without a window the 0.5/99.5 percentiles of the rescaled values map to 0 and 1."""
    ds = _dataset("CT_small.dcm")
    decoded = _decoded("CT_small.dcm")
    _assert_float_chw(decoded, 1, int(ds.Rows), int(ds.Columns))
    assert decoded.mode == "MONOCHROME2" and decoded.bit_depth == 16
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    np.testing.assert_allclose(decoded.pixels[0], np.clip((values - low) / (high - low), 0, 1), atol=1e-6)
    pixels = decoded.pixels[0]
    assert float(pixels.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(pixels.max()) == pytest.approx(1.0, abs=1e-6)
    # A robust stretch clips only the tails: about 0.5 % each end, never a large part of the image.
    assert np.mean(pixels <= 0.0) < 0.02 and np.mean(pixels >= 1.0) < 0.02


def test_ct_output_is_monotonic_in_raw_value() -> None:
    """A pixel with a larger stored value never comes out darker than one with a smaller value."""
    raw = _dataset("CT_small.dcm").pixel_array.ravel()
    pixels = _decoded("CT_small.dcm").pixels[0].ravel()
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(pixels[order]) >= 0)
    assert np.corrcoef(raw, pixels)[0, 1] > 0.99


def test_mr_window_matches_pydicom() -> None:
    """The MR's 600/1600 window is applied and scaled by the signed output range, not by min/max."""
    ds = _dataset("MR_small.dcm")
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    decoded = _decoded("MR_small.dcm")
    _assert_float_chw(decoded, 1, 64, 64)
    assert decoded.mode == "MONOCHROME2" and decoded.bit_depth == 16
    np.testing.assert_allclose(decoded.pixels[0], _expected_voi(ds), atol=1e-6)
    # Brighter tissue stays brighter.
    raw = ds.pixel_array
    assert float(decoded.pixels[0][raw == raw.max()].min()) > float(decoded.pixels[0][raw == raw.min()].max())


def test_negative_rescale_slope_with_a_window_matches_pydicom_and_is_not_black(tmp_path) -> None:
    """RescaleSlope -1 (rescaled = intercept - stored) with a window on the rescaled values: pydicom's window
    output then runs from a larger y_min to a smaller y_max; scaled by that signed range the image keeps its
    contrast, and a larger rescaled value is brighter (it had decoded all black)."""
    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = -1, 4000
    ds.WindowCenter, ds.WindowWidth = 4000 - 600, 1600
    path = tmp_path / "negative-slope.dcm"
    ds.save_as(path)
    decoded = decode(path).pixels[0]
    rescaled = apply_modality_lut(ds.pixel_array, ds)
    windowed = apply_voi_lut(rescaled, ds).astype(np.float64)
    bits = int(ds.BitsStored)
    stored_low, stored_high = (0.0, 2.0**bits - 1) if int(ds.PixelRepresentation) == 0 else (
        -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    y_min, y_max = stored_low * -1 + 4000, stored_high * -1 + 4000  # pydicom's output range, y_min > y_max
    np.testing.assert_allclose(decoded, np.clip((windowed - y_min) / (y_max - y_min), 0, 1), atol=1e-6)
    assert decoded.mean() > 0.05 and decoded.std() > 0.05
    raw = ds.pixel_array
    assert float(decoded[raw == raw.min()].min()) > float(decoded[raw == raw.max()].max())  # larger rescaled: brighter


def test_voi_lut_sequence_scaled_by_lut_depth() -> None:
    """A VOI LUT Sequence is preferred over a window and scaled by its own 16-bit entry range."""
    ds = _dataset("vlut_04.dcm")
    assert int(ds.VOILUTSequence[0].LUTDescriptor[2]) == 16
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=True) / 65535.0
    np.testing.assert_allclose(_decoded("vlut_04.dcm").pixels[0], expected, atol=1e-6)


def test_rgb_dicom_has_three_channels() -> None:
    """Colour secondary captures stay colour, scaled by their bits stored."""
    ds = _dataset("SC_rgb.dcm")
    decoded = _decoded("SC_rgb.dcm")
    _assert_float_chw(decoded, 3, 100, 100)
    assert decoded.mode == "RGB" and decoded.bit_depth == 8
    np.testing.assert_allclose(decoded.pixels, np.moveaxis(ds.pixel_array, -1, 0) / 255.0, atol=1e-6)
    np.testing.assert_allclose(decoded.pixels[:, 5, 5], [1.0, 0.0, 0.0], atol=1e-6)  # the red band


def test_ybr_dicom_matches_its_rgb_twin() -> None:
    """SC_ybr_full_uncompressed.dcm is SC_rgb.dcm stored as YBR_FULL: both must decode to the same colours."""
    ybr = _decoded("SC_ybr_full_uncompressed.dcm")
    _assert_float_chw(ybr, 3, 100, 100)
    np.testing.assert_allclose(ybr.pixels, _decoded("SC_rgb.dcm").pixels, atol=8 / 255)


def test_palette_color_dicom_becomes_rgb() -> None:
    """PALETTE COLOR pixels are indices: they must go through the colour LUT to (3, H, W)."""
    ds = pydicom.dcmread(_testdata("examples_palette.dcm"))
    decoded = decode(_testdata("examples_palette.dcm"))
    _assert_float_chw(decoded, 3, int(ds.Rows), int(ds.Columns))
    expected = np.moveaxis(apply_color_lut(ds.pixel_array, ds), -1, 0) / 65535.0
    np.testing.assert_allclose(decoded.pixels, expected, atol=1 / 255)


# --- DICOM: files users bring ---------------------------------------------------------------------


def test_compressed_dicom_without_decoder_names_syntax_and_package() -> None:
    """An undecodable transfer syntax says which file, which syntax, and what to install, on one line."""
    if importlib.util.find_spec("pylibjpeg") or importlib.util.find_spec("gdcm"):
        pytest.skip("a JPEG Lossless decoder is installed here")
    path = _testdata("JPEG-LL.dcm")
    message = _error_message(path)
    assert str(path) in message
    assert "JPEG Lossless" in message
    assert "pylibjpeg" in message or "gdcm" in message



def test_12_bit_jpeg_error_names_the_decoder_package() -> None:
    """Pillow refuses 12-bit JPEG without naming a package; the one line names what decodes it."""
    path = _testdata("JPEG-lossy.dcm")
    try:
        decode(path)
    except DecodeError:
        message = _error_message(path)
        assert "JPEG Extended" in message and "pip install pylibjpeg pylibjpeg-libjpeg" in message
    else:
        pytest.skip("a 12-bit JPEG decoder is installed here")

def test_truncated_dicom_pixel_data_is_one_line_error() -> None:
    """Short pixel data is reported with the file and syntax instead of a pydicom traceback."""
    path = _testdata("MR_truncated.dcm")
    message = _error_message(path)
    assert str(path) in message and "Explicit VR Little Endian" in message


def test_dicom_without_pixel_data_is_rejected() -> None:
    """An RT plan has no image: the message says so rather than failing deep in pydicom."""
    path = _testdata("rtplan.dcm")
    message = _error_message(path)
    assert str(path) in message and "without pixel data" in message


def test_dicom_without_suffix_detected_by_preamble(tmp_path: Path) -> None:
    """PACS exports like IM0001 have no suffix; the DICM marker alone identifies them."""
    path = tmp_path / "IM0001"
    shutil.copyfile(_testdata("RG3_UNCI.dcm"), path)
    assert is_dicom_file(path)
    assert is_image_file(path)
    decoded = decode(path)
    reference = _decoded("RG3_UNCI.dcm")
    np.testing.assert_array_equal(decoded.pixels, reference.pixels)
    assert (decoded.mode, decoded.bit_depth, decoded.original_size) == (
        reference.mode,
        reference.bit_depth,
        reference.original_size,
    )


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("scan.DCM", b"", True),  # the suffix is trusted, in any case
        ("IM0002", b"\0" * 128 + b"DICM" + b"\0" * 16, True),
        ("IM0003", b"\0" * 128 + b"DIC", False),  # too short to hold the marker
        ("notes", b"x" * 200, False),
        ("picture.png", b"\0" * 128 + b"XXXX", False),
    ],
)
def test_is_dicom_file(tmp_path: Path, name: str, content: bytes, expected: bool) -> None:
    """Detection uses the suffix or the 128-byte preamble plus DICM, nothing else."""
    path = tmp_path / name
    path.write_bytes(content)
    assert is_dicom_file(path) is expected


def test_is_dicom_file_missing_path_is_false(tmp_path: Path) -> None:
    """A vanished file is simply not DICOM rather than an OSError during a directory scan."""
    assert is_dicom_file(tmp_path / "gone") is False


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("b.JPG", True),
        ("c.jpeg", True),
        ("d.tiff", True),
        ("e.bmp", True),
        ("f.txt", False),
        ("g.csv", False),
    ],
)
def test_is_image_file_by_suffix(tmp_path: Path, name: str, expected: bool) -> None:
    """Pictures are recognised by suffix, case-insensitively, so scans pick them up without opening them."""
    path = tmp_path / name
    path.write_bytes(b"x" * 10)
    assert is_image_file(path) is expected


def test_multiframe_default_is_first_frame() -> None:
    """Frame 0 is the default and matches an independent stretch of the first frame."""
    ds = _dataset("emri_small.dcm")
    assert int(ds.NumberOfFrames) == 10
    decoded = _decoded("emri_small.dcm")
    _assert_float_chw(decoded, 1, 64, 64)
    values = ds.pixel_array[0].astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    np.testing.assert_allclose(decoded.pixels[0], np.clip((values - low) / (high - low), 0, 1), atol=1e-6)
    np.testing.assert_array_equal(decoded.pixels, _decoded("emri_small.dcm", 0).pixels)


def test_multiframe_other_frame_differs() -> None:
    """Asking for frame 1 returns frame 1, not frame 0 again."""
    ds = _dataset("emri_small.dcm")
    second = _decoded("emri_small.dcm", 1)
    _assert_float_chw(second, 1, 64, 64)
    assert not np.array_equal(second.pixels, _decoded("emri_small.dcm").pixels)
    raw = ds.pixel_array[1].ravel()
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(second.pixels[0].ravel()[order]) >= 0)


@pytest.mark.parametrize(("name", "frame"), [("emri_small.dcm", 10), ("emri_small.dcm", -1), ("CT_small.dcm", -1)])
def test_frame_out_of_range(name: str, frame: int) -> None:
    """A frame the file does not have is a DecodeError naming the frame count, never an IndexError."""
    path = _testdata(name)
    message = _error_message(path, frame=frame)
    assert str(path) in message and f"frame {frame}" in message


def test_single_frame_file_ignores_a_frame_choice() -> None:
    """--frame picks frames of multi-frame files; a single-frame file in the same folder keeps its one frame."""
    assert np.array_equal(decode(_testdata("CT_small.dcm"), frame=3).pixels, _decoded("CT_small.dcm").pixels)


def test_patient_id_is_read_raw(tmp_path: Path) -> None:
    """The raw PatientID is handed to the caller, which hashes it before it goes anywhere."""
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0042"
    path = tmp_path / "patient.dcm"
    ds.save_as(path)
    assert decode(path).patient_id == "PID-0042"
    assert _decoded("RG1_UNCI.dcm").patient_id == str(_dataset("RG1_UNCI.dcm").PatientID)


def test_empty_patient_id_is_none() -> None:
    """An empty PatientID is None, so callers do not hash the empty string into one shared 'patient'."""
    assert str(_dataset("emri_small.dcm").PatientID) == ""
    assert _decoded("emri_small.dcm").patient_id is None


# --- pictures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_range_kept(tmp_path: Path, suffix: str) -> None:
    """16-bit X-ray exports keep all 65536 levels instead of being clipped to 8 bits."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = _save(Image.fromarray(ramp), tmp_path / f"ramp{suffix}")
    decoded = decode(path)
    _assert_float_chw(decoded, 1, 256, 256)
    assert decoded.bit_depth == 16
    assert decoded.mode.startswith("I")
    assert decoded.original_size == (256, 256)
    np.testing.assert_allclose(decoded.pixels[0], ramp / 65535.0, atol=1e-6)
    assert np.unique(decoded.pixels).size == 65536
    # 256 and 257 differ only in the low byte: they must stay distinct.
    assert decoded.pixels[0, 1, 0] < decoded.pixels[0, 1, 1]


def test_sixteen_bit_scaled_by_format_not_content(tmp_path: Path) -> None:
    """A dim 16-bit image stays dim: scaling uses 65535, not the image's own maximum."""
    dim = np.full((8, 8), 1000, dtype=np.uint16)
    dim[0, 0] = 4000
    decoded = decode(_save(Image.fromarray(dim), tmp_path / "dim.png"))
    assert float(decoded.pixels.max()) == pytest.approx(4000 / 65535, abs=1e-6)
    assert float(decoded.pixels[0, 1, 1]) == pytest.approx(1000 / 65535, abs=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    """A phone photo with Orientation=6 is rotated upright; original_size still reports the stored size."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, right half blue as stored
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    decoded = decode(_save(Image.fromarray(stored), tmp_path / f"photo{suffix}", exif=exif))
    _assert_float_chw(decoded, 3, 40, 20)
    assert decoded.original_size == (40, 20)
    # Orientation 6 means "rotate 90 degrees clockwise to display": stored left becomes displayed top.
    np.testing.assert_allclose(decoded.pixels[:, 2:18].mean(axis=(1, 2)), [1, 0, 0], atol=0.05)
    np.testing.assert_allclose(decoded.pixels[:, 22:38].mean(axis=(1, 2)), [0, 0, 1], atol=0.05)
    if suffix == ".png":  # lossless: the rotation is exact, pixel for pixel
        np.testing.assert_array_equal(decoded.pixels, np.moveaxis(np.rot90(stored, k=-1), -1, 0) / np.float32(255))


def test_palette_png_colours(tmp_path: Path) -> None:
    """A colour palette expands to the palette's RGB values, not to the indices."""
    image = Image.new("P", (4, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (252 * 3))
    image.putdata([0, 1, 2, 3])
    decoded = decode(_save(image, tmp_path / "palette.png"))
    _assert_float_chw(decoded, 3, 1, 4)
    assert decoded.mode == "P" and decoded.bit_depth == 8
    expected = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]).T / 255.0
    np.testing.assert_allclose(decoded.pixels[:, 0, :], expected, atol=1e-6)


def test_grey_palette_png_is_one_channel(tmp_path: Path) -> None:
    """A palette holding only greys is grayscale data and stays one channel."""
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 0, 50, 50, 50, 200, 200, 200] + [0] * (253 * 3))
    image.putdata([0, 1, 2, 1])
    decoded = decode(_save(image, tmp_path / "grey palette.png"))
    _assert_float_chw(decoded, 1, 1, 4)
    np.testing.assert_allclose(decoded.pixels[0, 0], np.array([0, 50, 200, 50]) / 255.0, atol=1e-6)


def test_palette_transparency_is_black(tmp_path: Path) -> None:
    """A transparent palette entry is composited to black, not shown as its hidden colour."""
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    image.putdata([0, 1])
    decoded = decode(_save(image, tmp_path / "palette-transparent.png", transparency=1))
    _assert_float_chw(decoded, 3, 1, 2)
    np.testing.assert_allclose(decoded.pixels[:, 0, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(decoded.pixels[:, 0, 1], [0, 0, 0], atol=1e-6)


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    """RGBA drops alpha by colour * alpha, so transparent pixels are black like padding."""
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 0]], [[200, 100, 50, 128], [255, 255, 255, 0]]], dtype=np.uint8
    )
    decoded = decode(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    _assert_float_chw(decoded, 3, 2, 2)
    assert decoded.mode == "RGBA"
    expected = np.moveaxis(rgba[..., :3] / 255.0 * (rgba[..., 3:] / 255.0), -1, 0)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)
    np.testing.assert_array_equal(decoded.pixels[:, 1, 1], [0, 0, 0])  # white but fully transparent


def test_la_is_one_channel_composited(tmp_path: Path) -> None:
    """Grey plus alpha stays one channel, composited on black."""
    la = np.array([[[100, 255], [100, 0]], [[200, 51], [0, 0]]], dtype=np.uint8)
    decoded = decode(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    _assert_float_chw(decoded, 1, 2, 2)
    np.testing.assert_allclose(decoded.pixels[0] * 255, [[100, 0], [40, 0]], atol=1e-3)


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((255, 0, 0, 0), (0, 1, 1)),
        ((0, 255, 255, 0), (1, 0, 0)),
        ((0, 0, 0, 255), (0, 0, 0)),
        ((0, 0, 0, 0), (1, 1, 1)),
    ],
    ids=["cyan", "red", "black", "white"],
)
def test_cmyk_jpeg_to_rgb(tmp_path: Path, cmyk: tuple[int, ...], rgb: tuple[int, ...]) -> None:
    """Print-shop CMYK JPEGs become plausible RGB (cyan is green + blue), not inverted colours."""
    path = _save(Image.new("CMYK", (16, 16), cmyk), tmp_path / "cmyk.jpg", quality=95)
    decoded = decode(path)
    _assert_float_chw(decoded, 3, 16, 16)
    assert decoded.mode == "CMYK"
    np.testing.assert_allclose(decoded.pixels[:, 8, 8], rgb, atol=0.05)


def test_bilevel_is_one_channel_one_bit(tmp_path: Path) -> None:
    """Mode '1' scans give 0/1 pixels and report bit depth 1."""
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    decoded = decode(_save(Image.fromarray(bits), tmp_path / "bilevel.png"))
    _assert_float_chw(decoded, 1, 2, 3)
    assert decoded.mode == "1" and decoded.bit_depth == 1
    np.testing.assert_array_equal(decoded.pixels[0], bits.astype(np.float32))


def test_grayscale_stays_one_channel(tmp_path: Path) -> None:
    """'L' images stay one channel, scaled by 255 (not by their own min/max)."""
    grey = np.array([[0, 64, 128], [192, 200, 255]], dtype=np.uint8)
    decoded = decode(_save(Image.fromarray(grey), tmp_path / "grey.png"))
    _assert_float_chw(decoded, 1, 2, 3)
    assert decoded.mode == "L" and decoded.bit_depth == 8 and decoded.original_size == (3, 2)
    np.testing.assert_allclose(decoded.pixels[0], grey / 255.0, atol=1e-6)


def test_rgb_png_is_exact(tmp_path: Path) -> None:
    """Plain RGB goes channel-first with values / 255 and nothing else."""
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    decoded = decode(_save(Image.fromarray(rgb), tmp_path / "rgb.png"))
    _assert_float_chw(decoded, 3, 5, 7)
    np.testing.assert_allclose(decoded.pixels, np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)


# --- bad files -------------------------------------------------------------------------------------


def test_empty_file_says_empty(tmp_path: Path) -> None:
    """A 0-byte file (an interrupted copy) is named as empty, not as a mysterious decoder failure."""
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    message = _error_message(path)
    assert "empty" in message and str(path) in message


def test_missing_file_is_decode_error(tmp_path: Path) -> None:
    """A path that is not a file is a DecodeError, not a FileNotFoundError."""
    path = tmp_path / "missing.png"
    assert str(path) in _error_message(path)


def _real_png_bytes(tmp_path: Path) -> bytes:
    """Bytes of a valid noisy PNG, so corruption lands in compressed data."""
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return _save(Image.fromarray(noise), tmp_path / "source.png").read_bytes()


def _real_jpeg_bytes(tmp_path: Path) -> bytes:
    """Bytes of a valid noisy JPEG for truncation."""
    noise = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return _save(Image.fromarray(noise), tmp_path / "source.jpg").read_bytes()


def _first_half(data: bytes) -> bytes:
    """Simulate an interrupted copy."""
    return data[: len(data) // 2]


def _flip_idat(data: bytes) -> bytes:
    """Corrupt the compressed stream while keeping the file structure plausible."""
    start = data.index(b"IDAT") + 10
    corrupted = bytearray(data)
    for offset in range(start, start + 200):
        corrupted[offset] ^= 0x55
    return bytes(corrupted)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("random.png", lambda tmp: np.random.default_rng(3).bytes(500)),
        ("truncated.png", lambda tmp: _first_half(_real_png_bytes(tmp))),
        ("corrupt idat.png", lambda tmp: _flip_idat(_real_png_bytes(tmp))),
        ("truncated.jpg", lambda tmp: _first_half(_real_jpeg_bytes(tmp))),
        ("notes.jpg", lambda tmp: b"patient list\nnot an image\n"),
        ("kaputt ä.png", lambda tmp: b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
    ],
)
def test_unreadable_picture_is_one_line_error(tmp_path: Path, name: str, make) -> None:
    """Corrupt, truncated or mislabelled files give one actionable line naming the file."""
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    message = _error_message(path)
    assert str(path) in message
    assert "not a readable image" in message


def test_huge_dimensions_are_decode_error(tmp_path: Path) -> None:
    """A header claiming 20000 x 20000 pixels trips Pillow's bomb guard; that must surface as DecodeError."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path = tmp_path / "huge.png"
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    assert str(path) in _error_message(path)


@pytest.mark.parametrize("name", ["Röntgen bild ü.png", "胸部 X線.png", "patient 01 (copy).png"])
def test_unusual_picture_names_decode(tmp_path: Path, name: str) -> None:
    """Spaces and non-ASCII letters in names are common in exports and must not matter."""
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    decoded = decode(_save(Image.fromarray(grey), tmp_path / name))
    np.testing.assert_allclose(decoded.pixels[0], grey / 255.0, atol=1e-6)


def test_unusual_dicom_name_decodes(tmp_path: Path) -> None:
    """A DICOM with spaces and umlauts in its name decodes like the original."""
    path = tmp_path / "Röntgen bild ü.dcm"
    shutil.copyfile(_testdata("MR_small.dcm"), path)
    np.testing.assert_array_equal(decode(path).pixels, _decoded("MR_small.dcm").pixels)


# --- masks ---------------------------------------------------------------------------------------


def _rectangle_mask(value: int = 255) -> np.ndarray:
    """A 32 x 24 mask with rows 10..19 and cols 5..14 set: box (5, 10, 15, 20)."""
    mask = np.zeros((32, 24), dtype=np.uint8)
    mask[10:20, 5:15] = value
    return mask


@pytest.mark.parametrize("value", [255, 1, 37])
def test_load_mask_and_box(tmp_path: Path, value: int) -> None:
    """Any non-zero pixel is defect, whatever value the annotation tool wrote."""
    mask = load_mask(_save(Image.fromarray(_rectangle_mask(value)), tmp_path / "mask.png"))
    assert mask.dtype == bool and mask.shape == (32, 24)
    assert int(mask.sum()) == 100
    assert mask_box(mask) == (5, 10, 15, 20)


def test_rgb_mask_is_loaded(tmp_path: Path) -> None:
    """Colour masks (a red outline tool) also count their non-black pixels."""
    rgb = np.zeros((32, 24, 3), dtype=np.uint8)
    rgb[10:20, 5:15] = (255, 0, 0)
    mask = load_mask(_save(Image.fromarray(rgb), tmp_path / "red mask.png"))
    assert mask_box(mask) == (5, 10, 15, 20)


def test_mask_box_edges() -> None:
    """Exclusive ends: a single pixel is a 1 x 1 box, and a full mask covers the image."""
    single = np.zeros((5, 6), dtype=bool)
    single[2, 3] = True
    assert mask_box(single) == (3, 2, 4, 3)
    assert mask_box(np.ones((5, 6), dtype=bool)) == (0, 0, 6, 5)


def test_empty_mask_has_no_box(tmp_path: Path) -> None:
    """A normal (defect-free) sample has no box."""
    assert mask_box(np.zeros((8, 8), dtype=bool)) is None
    mask = load_mask(_save(Image.fromarray(np.zeros((8, 8), dtype=np.uint8)), tmp_path / "empty mask.png"))
    assert mask_box(mask) is None


def test_unreadable_mask_is_decode_error(tmp_path: Path) -> None:
    """A broken mask file names itself in one line."""
    path = tmp_path / "mask.png"
    path.write_bytes(b"not a png")
    with pytest.raises(DecodeError) as excinfo:
        load_mask(path)
    assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)
