"""Floor 0, the words of bnlab: what a run is (config dataclasses, defaults, units), what it measures (the
metrics) and the names every other floor shares (TensorBoard tags, the baseline norm, file names). Imports
neither torch nor any other bnlab floor."""
