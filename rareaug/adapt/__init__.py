"""`rareaug adapt`: adapt the base model to the user's domain before the per-image LoRAs."""
