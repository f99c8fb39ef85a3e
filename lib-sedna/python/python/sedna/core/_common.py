"""Helpers shared by the Sedna-style worker classes."""


def num_samples(data):
    """How many samples `data` holds: a datasource's `x` or `num_samples`, the first array of
    an `(x, y)` pair, or its length."""
    if data is None:
        return 0
    for attribute in ("x", "num_samples"):
        value = getattr(data, attribute, None)
        if value is not None:
            return int(value() if callable(value) else len(value))
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "__len__"):
        return len(data[0])
    return len(data)
