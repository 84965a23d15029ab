"""LR schedules: exact values at the landmark steps, each worked out by hand from the formulas.

Landmarks for every schedule: step 0, the last warmup step (the peak), the midpoint of the decay,
the last step (total_steps - 1) and past the end. Unless a test says otherwise: max_lr 1.0,
min_lr 0.1, warmup_steps 10 (peak at step 9), total_steps 110 (last step 109), so the decay spans
109 - 9 = 100 steps and its midpoint is step 59.
"""

import math

import pytest

from minillm.training.schedulers import (
    SCHEDULE_NAMES,
    ScheduleConfig,
    constant_lr,
    cosine_lr,
    get_lr,
    inv_sqrt_lr,
    linear_lr,
    wsd_decay_start,
    wsd_lr,
)


def cfg(name, **kw):
    base = dict(name=name, max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    base.update(kw)
    return ScheduleConfig(**base)


def lrs(c, steps):
    return [get_lr(s, c) for s in steps]


def test_constant():
    # warmup (s+1)/10, then 1.0 for ever, past the end included
    assert lrs(cfg("constant"), [0, 4, 9, 10, 59, 109, 110, 10**6]) == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], abs=1e-12
    )


def test_linear():
    # p = (s - 9) / 100; lr = 1 - 0.9 p
    expected = [0.1, 1.0, 1 - 0.9 * 0.01, 0.55, 1 - 0.9 * 0.75, 0.1, 0.1, 0.1]
    assert (lrs(cfg("linear"), [0, 9, 10, 59, 84, 109, 110, 5000])
            == pytest.approx(expected, abs=1e-12))


def test_cosine():
    # lr = 0.1 + 0.45 (1 + cos(pi p)); midpoint p = 1/2 -> 0.55;
    # p = 1/4 -> 0.1 + 0.45 (1 + sqrt(2)/2)
    quarter = 0.1 + 0.45 * (1 + 0.7071067811865476)
    three_quarters = 0.1 + 0.45 * (1 - 0.7071067811865476)
    expected = [0.1, 1.0, quarter, 0.55, three_quarters, 0.1, 0.1, 0.1]
    assert (lrs(cfg("cosine"), [0, 9, 34, 59, 84, 109, 110, 5000])
            == pytest.approx(expected, abs=1e-12))


def test_wsd():
    # total 100, decay_frac 0.2: the last 20 steps cool down; S = 99 - 20 = 79
    # is the last step at max_lr
    c = cfg("wsd", total_steps=100, decay_frac=0.2)
    assert wsd_decay_start(100, 0.2) == 79
    # q = (s - 79) / 20; lr = 0.1 + 0.9 (1 - sqrt(q)): s=84 -> q=1/4 -> 0.55; s=89 -> q=1/2
    half = 0.1 + 0.9 * (1 - 0.7071067811865476)
    expected = [0.1, 1.0, 1.0, 1.0, 0.55, half, 0.1, 0.1, 0.1]
    assert lrs(c, [0, 9, 49, 79, 84, 89, 99, 100, 5000]) == pytest.approx(expected, abs=1e-12)
    # exactly 20 steps sit strictly below max_lr after the warmup
    assert sum(get_lr(s, c) < 1.0 for s in range(10, 100)) == 20


def test_inv_sqrt():
    # warmup 4: (s+1)/4, then sqrt(4 / (s+1)) floored at 0.1; no horizon, so
    # past total_steps it goes on
    c = cfg("inv_sqrt", warmup_steps=4, total_steps=100)
    expected = [0.25, 1.0, 0.5, 0.25, 0.2, 0.1, 0.1]
    assert lrs(c, [0, 3, 15, 63, 99, 399, 10**6]) == pytest.approx(expected, abs=1e-12)
    # step 100 is past total_steps but still on the curve: sqrt(4/101)
    assert get_lr(100, c) == pytest.approx(math.sqrt(4 / 101), abs=1e-12)


def test_no_warmup_starts_at_max_and_w1_equals_w0():
    for name in SCHEDULE_NAMES:
        kw = dict(decay_frac=0.2) if name == "wsd" else {}
        c0, c1 = cfg(name, warmup_steps=0, **kw), cfg(name, warmup_steps=1, **kw)
        assert get_lr(0, c0) == 1.0, name
        assert lrs(c0, range(120)) == lrs(c1, range(120)), name
    # without warmup the linear decay spans the 109 steps from step 0 to step 109
    assert get_lr(109, cfg("linear", warmup_steps=0)) == pytest.approx(0.1, abs=1e-12)
    assert get_lr(1, cfg("linear", warmup_steps=0)) == pytest.approx(1 - 0.9 / 109, abs=1e-12)


def test_shapes_monotone_after_peak_and_bounded():
    for name in SCHEDULE_NAMES:
        c = cfg(name)
        seq = lrs(c, range(200))
        assert seq[:10] == pytest.approx([(s + 1) / 10 for s in range(10)], abs=1e-12), name
        assert all(a >= b for a, b in zip(seq[9:], seq[10:], strict=False)), name
        assert all(0.1 - 1e-12 <= v <= 1.0 + 1e-12 for v in seq[9:]), name


def test_direct_functions_match_get_lr():
    assert constant_lr(3, 2.0, 8) == 2.0 * 4 / 8
    assert linear_lr(59, 1.0, 0.1, 10, 110) == get_lr(59, cfg("linear"))
    assert cosine_lr(34, 1.0, 0.1, 10, 110) == get_lr(34, cfg("cosine"))
    assert wsd_lr(84, 1.0, 0.1, 10, 100, 0.2) == pytest.approx(0.55, abs=1e-12)
    assert inv_sqrt_lr(15, 1.0, 0.0, 4) == 0.5


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        ScheduleConfig(name="cosin")
    c = cfg("cosine")
    c.name = "nope"  # mutated after validation: get_lr still refuses
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        get_lr(0, c)
    with pytest.raises(ValueError, match="min_lr=2.0"):
        cfg("cosine", min_lr=2.0)
    with pytest.raises(ValueError, match="warmup_steps=110, total_steps=110"):
        cfg("cosine", warmup_steps=110)
    with pytest.raises(ValueError, match="decay_frac"):
        cfg("wsd", decay_frac=0.0)
    with pytest.raises(ValueError, match="before the warmup peak"):
        cfg("wsd", warmup_steps=100, decay_frac=0.5)
    with pytest.raises(ValueError, match="is empty"):
        cfg("wsd", decay_frac=0.001)
    with pytest.raises(ValueError, match="step must be >= 0, found -1"):
        get_lr(-1, cfg("constant"))
    # constant needs no room to decay: a warmup longer than the run is allowed
    assert get_lr(0, cfg("constant", warmup_steps=200, total_steps=10)) == pytest.approx(1 / 200)
