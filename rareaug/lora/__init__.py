"""The LoRA bank, its training and its files."""
