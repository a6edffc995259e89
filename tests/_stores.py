"""Comparing two POLCA stores variable by variable (shared by the tests of the entry points)."""

import numpy as np


def same_stores(a, b, rtol=1e-4, floor=1e-4, exact=("step", "basis_step")):
    """Every variable of store ``b`` equals ``a``'s: ``exact`` ones exactly, floats to ``rtol``
    plus ``floor`` times the variable's largest magnitude (an entry far below its variable's
    scale carries the scale's rounding)."""
    assert a.sizes == b.sizes
    for name in a.variables:
        x, y = a[name].values, b[name].values
        if name in exact or not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(y, x, err_msg=name)
            continue
        np.testing.assert_array_equal(np.isnan(y), np.isnan(x), err_msg=name)
        ok = ~np.isnan(x)
        scale = float(np.abs(x[ok]).max()) if ok.any() else 0.0
        np.testing.assert_allclose(y, x, rtol=rtol, atol=floor * scale, err_msg=name)
