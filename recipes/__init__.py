"""Shipped recipes (installed as the package `rareaug.recipes`): YAML files of the Config's fields."""
