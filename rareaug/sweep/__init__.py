"""The ratio sweep: classifiers trained on real + synthetic mixes, metrics with intervals, a recommendation."""
