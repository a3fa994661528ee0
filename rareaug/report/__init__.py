"""The HTML report of a run: what the synthetic images look like, how each metric moves with the ratio, which
ratio to use and whether any synthetic image is a near-copy of a real one."""
from .page import render, write_report

__all__ = ["render", "write_report"]
