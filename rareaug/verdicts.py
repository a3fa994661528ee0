"""The words for a gain over ratio 0, shared by every output that judges one (sweep summary, report, evidence),
so that none of them says more than the interval allows."""
from __future__ import annotations

GAIN = "a gain beyond noise"
LOSS = "a loss beyond noise"
NOISE = "not distinguishable from noise"
TOO_FEW = "too few runs to judge"


def gain_verdict(gain: dict) -> str:
    """The verdict in words; summaries written before the two-level interval resampled test images only."""
    if "verdict" in gain:
        return gain["verdict"]
    if gain.get("distinguishable"):
        word = GAIN if gain.get("low", 0) > 0 else LOSS
    else:
        word = NOISE
    return f"{word} (test images only: training noise not counted)"


def gain_kind(gain: dict) -> str:
    """What the interval resampled, e.g. 'seeds x folds x test images, 15 runs'."""
    return f"{gain['interval_kind']}, {gain['runs']} runs" if "interval_kind" in gain else "test images only"
