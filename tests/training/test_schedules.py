"""The teacher's EMA update and the schedules that drive training: cosine with warm-up (learning
rate, weight decay, teacher momentum) and the teacher temperature warm-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.schedules import cosine_schedule, teacher_temp_schedule
from training.train import update_teacher


def test_teacher_ema_update():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t_before = [p.detach().clone() for p in teacher.parameters()]
    update_teacher(student, teacher, 0.9)
    for t_new, t_old, s in zip(teacher.parameters(), t_before, student.parameters(), strict=True):
        assert torch.allclose(t_new, 0.9 * t_old + 0.1 * s.detach())
    update_teacher(student, teacher, 1.0)  # momentum 1: teacher frozen
    update_teacher(student, teacher, 0.0)  # momentum 0: teacher = student
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(t, s.detach())


def test_cosine_schedule_with_warmup():
    sched = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(sched) == 40
    assert sched[0] == 0.0 and sched[9] == pytest.approx(0.9)  # linear warm-up, 10 steps
    assert sched[10] == pytest.approx(1.0)  # peak right after warm-up
    # the reference formula: the last step is one cosine step short of the final value
    assert sched[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 29 / 30)))
    assert np.all(np.diff(sched[10:]) <= 1e-12)  # monotone decay
    # half-way through the cosine part: the mean of base and final
    assert sched[10 + 15] == pytest.approx(0.55)
    momentum = cosine_schedule(0.996, 1.0, epochs=2, steps_per_epoch=5)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0, abs=1e-4)


def test_teacher_temperature_warmup():
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=6)
    assert temps.tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
