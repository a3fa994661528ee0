"""LPIPS (AlexNet), loaded in one place for the guard's `--guard-distance lpips` and the sweep's diversity.

`lpips.LPIPS(net="alex")` takes its backbone from torchvision, which reads torchvision's cache and downloads
into it when the file is missing. The file is made sure of first (`rareaug.downloads.torch_hub_file`), so an
offline machine never starts a download and gets one line instead; the LPIPS layers ship with the lpips package.
"""
from __future__ import annotations

import warnings

import torch

from .downloads import torch_hub_file
from .errors import RareaugError, one_line


def alexnet_url() -> str:
    """The AlexNet file lpips asks torchvision for (torchvision's IMAGENET1K_V1 weights)."""
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1.url


def load_lpips(device: torch.device | str = "cpu", alternatives: str = ""):
    """LPIPS with AlexNet, in eval mode on `device`.

    Raises:
        RareaugError: the AlexNet weights are not cached and may not (offline) or could not be downloaded.
    """
    path = torch_hub_file(alexnet_url(), "LPIPS's AlexNet backbone", alternatives)
    import lpips

    with warnings.catch_warnings():  # lpips asks torchvision for `pretrained=True`, deprecated twice over each load
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*deprecated", category=UserWarning)
        try:
            return lpips.LPIPS(net="alex", verbose=False).to(device).eval()
        except Exception as error:  # a truncated or corrupt cached file: one line naming it, as a missing one
            raise RareaugError(f"LPIPS's AlexNet backbone: {path} did not load ({one_line(error)}); delete it to "
                               f"download it again{', or ' + alternatives if alternatives else ''}") from error
