"""The jagged cosine schedule, checked against its definition at every step."""

import math

import pytest

from qrelora.schedule import JaggedCosine


def reference_lr(s, lr, total, warmup, min_ratio, every, rw, start):
    """The schedule written out from the ReLoRA paper (Lialin et al. 2023, section 3), independently of the
    implementation."""
    if s < warmup:
        env = lr * s / warmup
    else:
        progress = (s - warmup) / (total - warmup)
        env = lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if every and s >= start:
        k, pos = divmod(s - start, every)
        if rw == 0:
            return env  # no re-warm-up: no zero step either (the reference code zeroes only to ramp from it)
        if pos == every - 1:
            return 0.0  # the last step of a cycle, just before its merge
        if k > 0 or start > 0:
            env *= min(1.0, (pos + 1) / rw)
    return env


@pytest.mark.parametrize("start", [0, 20])
def test_every_step_matches_the_formula(start):
    args = dict(lr=1e-3, total=120, warmup=10, min_ratio=0.1, every=25, rw=5, start=start)
    sched = JaggedCosine(lr=1e-3, total_steps=120, warmup_steps=10, min_lr_ratio=0.1, restart_every=25,
                         restart_warmup=5, relora_start=start)
    for s in range(120):
        assert sched(s) == pytest.approx(reference_lr(s, **args), abs=1e-15), s


@pytest.mark.parametrize("start", [0, 20])
def test_no_rewarmup_means_no_zero_step(start):
    """restart_warmup = 0: the adapters train at the envelope on every step, the one before each merge too
    (it used to run at zero, so one-step cycles never trained the adapters at all)."""
    args = dict(lr=1e-3, total=120, warmup=0, min_ratio=0.1, every=1, rw=0, start=start)
    sched = JaggedCosine(lr=1e-3, total_steps=120, warmup_steps=0, min_lr_ratio=0.1, restart_every=1,
                         restart_warmup=0, relora_start=start)
    for s in range(120):
        assert sched(s) == pytest.approx(reference_lr(s, **args), abs=1e-15) and sched(s) > 0, s
    assert all(sched.merges_after(s) for s in range(start, 120)) and sched.idle_cycles() == []
    two_step = JaggedCosine(lr=1e-3, total_steps=4, warmup_steps=1, min_lr_ratio=0.1, restart_every=2,
                            restart_warmup=1)
    assert two_step.idle_cycles() == [(0, 1)]  # step 0 is the warm-up's zero, step 1 the zero before the merge


def test_restarts_drop_to_zero_and_merge_follows_the_zero_step():
    sched = JaggedCosine(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1, restart_every=20,
                         restart_warmup=4)
    merges = [s for s in range(100) if sched.merges_after(s)]
    assert merges == [19, 39, 59, 79, 99]  # 0-based: after the 20th, 40th, ... 100th step
    for s in merges:
        assert sched(s) == 0.0                          # the step just before each merge moves nothing
        assert sched(s - 1) > 0.5 * sched.envelope(s - 1)  # the step before it is on the envelope
        if s < 99:
            assert sched(s + 1) == pytest.approx(sched.envelope(s + 1) / 4)  # the ramp after it
            assert sched(s + 4) == pytest.approx(sched.envelope(s + 4))
    assert sched(0) == 0.0 and sched(10) == pytest.approx(1.0)
    assert sched.envelope(99) == pytest.approx(0.1, rel=0.01)


def test_warm_start_switch_rewarms_and_full_rank_has_no_restarts():
    sched = JaggedCosine(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1, restart_every=20,
                         restart_warmup=4, relora_start=40)
    assert sched(40) == pytest.approx(sched.envelope(40) / 4) and sched(39) == sched.envelope(39)
    assert [s for s in range(100) if sched.merges_after(s)] == [59, 79, 99]
    plain = JaggedCosine(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert not any(plain.merges_after(s) for s in range(100))
    assert all(plain(s) == plain.envelope(s) for s in range(100))


@pytest.mark.parametrize("start", [0, 20])
def test_relora_phase_runs_at_lr_ratio_times_the_formula(start):
    """relora.lr_ratio scales the ReLoRA phase only; the warm start keeps training.lr's schedule, and after a
    warm start the first cycle still ramps up from (almost) zero, so the rate never jumps at the switch."""
    args = dict(lr=1e-3, total=120, warmup=10, min_ratio=0.1, every=25, rw=5, start=start)
    sched = JaggedCosine(lr=1e-3, total_steps=120, warmup_steps=10, min_lr_ratio=0.1, restart_every=25,
                         restart_warmup=5, relora_start=start, relora_lr_ratio=2.0)
    for s in range(120):
        expected = reference_lr(s, **args) * (2.0 if s >= start else 1.0)
        assert sched(s) == pytest.approx(expected, abs=1e-15), s
    if start:
        assert sched(start) < sched(start - 1)  # ramps from a fifth of 2x the envelope, below the warm start's


def test_fully_trained_parameters_stay_on_the_envelope_in_every_phase():
    """Embeddings, norms and head have no restarts and are not scaled by relora.lr_ratio (their multiple is their
    group's, training.embedding_lr_ratio): the envelope before, at and after the switch; with jagged_all they
    drop and re-warm with the adapters, at 1x."""
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1, restart_every=20, restart_warmup=4,
              relora_start=40, relora_lr_ratio=3.0)
    sched = JaggedCosine(**kw)
    assert [sched.full_rate(s) for s in range(40)] == [sched(s) for s in range(40)]  # the warm start: one rate
    assert all(sched.full_rate(s) == sched.envelope(s) for s in range(100))
    assert sched(59) == 0.0 and sched.full_rate(59) > 0  # only the adapters stop before a merge
    assert sched(44) == pytest.approx(3.0 * sched.envelope(44))
    every = JaggedCosine(**kw, jagged_all=True)
    assert all(every.full_rate(s) == pytest.approx(every(s) / every.phase_ratio(s)) for s in range(100))
    assert every.full_rate(59) == 0.0