"""Fused-LoRA sampling in large batches, the comparison baselines, the manifest and the memorization guard."""
