"""The cost model: an exact linear cost is recovered, its leave-one-out error is then zero, and
coefficients stay non-negative when the data would pull one below zero."""

from __future__ import annotations

import numpy as np

from pangu_light.search.cost_model import CostModel, features, leave_one_out

BASE = {"hidden": 64, "layers": [[2, 2, 96]] * 4}


def shapes():
    out = []
    for hidden in (64, 48, 32):
        for ffn in (96, 48):
            for layers in (4, 2):
                for groups in (2, 1):
                    out.append({"hidden": hidden, "layers": [[groups, 2, ffn]] * layers})
    return out


def test_an_exact_cost_is_recovered():
    truth = np.array([0.1, 0.2, 0.3, 0.25, 0.15, 0.0])
    rows = [features(s, BASE, 16) for s in shapes()]
    model = CostModel.fit(rows, [r @ truth for r in rows])
    np.testing.assert_allclose(model.coefficients, truth, atol=1e-9)
    base = features(BASE, BASE, 16)
    assert np.allclose(base, 1.0)
    errors = leave_one_out(rows, [1 / (r @ truth) for r in rows], base)
    assert max(abs(e) for e in errors) < 1e-9


def test_coefficients_are_never_negative():
    rows = [features(s, BASE, 16) for s in shapes()]
    times = [1.0 - 0.3 * r[2] + 0.8 * r[3] for r in rows]  # attention "speeds up" the model
    model = CostModel.fit(rows, times)
    assert (model.coefficients >= 0).all()
