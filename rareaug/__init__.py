"""rareaug: few real images of a rare class -> per-image LoRAs fused at sampling time -> an honest ratio sweep."""
__version__ = "0.1.0"
