"""Readers for the layouts users already have: decode, label and group images; never write to the data."""
from .dataset import NEGATIVE_RULES, Dataset, load_dataset
from .decode import Decoded, DecodeError, decode, load_mask, mask_box
from .layouts import detect_layout, list_layouts
from .records import DataError, Problem, Record, Scan, one_line

__all__ = [
    "NEGATIVE_RULES", "Dataset", "load_dataset", "Decoded", "DecodeError", "decode", "load_mask", "mask_box",
    "detect_layout", "list_layouts", "DataError", "Problem", "Record", "Scan", "one_line",
]
