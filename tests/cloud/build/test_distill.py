"""Knowledge distillation in training: the loss is what its formula says, and a teacher guides the
student without being changed itself."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cloud.build.settings import SettingsError
from cloud.build.train import Teacher, TrainConfig, distillation_loss, predict_logits, train
from common import models
from common.datasets import Dataset

KWARGS = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}


def _softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def test_the_loss_on_known_logits_is_the_formula():
    student, teacher, label, alpha, temperature = [2.0, 0.0, -1.0], [0.0, 3.0, 1.0], 1, 0.7, 2.0
    p_student, p_teacher = _softmax(student, temperature), _softmax(teacher, temperature)
    kl = sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_teacher, p_student))
    cross_entropy = -math.log(_softmax(student, 1.0)[label])
    expected = alpha * temperature**2 * kl + (1 - alpha) * cross_entropy
    got = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]), alpha, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_and_a_perfect_student_pays_nothing_at_alpha_one():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(distillation_loss(student, teacher, labels, 0.0, 4.0), F.cross_entropy(student, labels))
    assert float(distillation_loss(teacher, teacher, labels, 1.0, 4.0)) == pytest.approx(0.0, abs=1e-6)
    # the soft term grows as the student moves away from the teacher
    near, far = (distillation_loss(teacher + d * student, teacher, labels, 1.0, 4.0) for d in (0.1, 1.0))
    assert float(near) < float(far)


@pytest.mark.parametrize(("alpha", "temperature"), [(-0.1, 4.0), (1.5, 4.0), (0.5, 0.0), (0.5, -1.0)])
def test_a_teacher_with_bad_settings_is_refused(alpha, temperature):
    with pytest.raises(SettingsError, match="alpha must be in \\[0, 1\\] and temperature > 0"):
        Teacher(models.build("vgg11", KWARGS), alpha, temperature)


def _kl_to(teacher: torch.nn.Module, student: torch.nn.Module, data: Dataset) -> float:
    target = predict_logits(teacher, data.info, data.train).log_softmax(1)
    found = predict_logits(student, data.info, data.train).log_softmax(1)
    return float(F.kl_div(found, target, reduction="batchmean", log_target=True))


def test_a_student_learns_the_teacher_and_the_teacher_stays_as_it_was(fashion_mnist, tmp_path):
    data = Dataset(fashion_mnist.info, fashion_mnist.train.subset(256, 0), fashion_mnist.val, fashion_mnist.test)
    torch.manual_seed(0)  # a teacher with definite, input-dependent outputs; a student that can copy them
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10)).eval()
    with torch.no_grad():
        teacher[1].weight.mul_(4)
    before = copy.deepcopy(teacher.state_dict())
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    untaught = _kl_to(teacher, student, data)
    config = TrainConfig(epochs=3, batch_size=32, lr=0.01, progress=False)
    guide = Teacher(teacher, alpha=1.0, temperature=2.0)
    train(student, data.info, data.train, config, checkpoint=tmp_path / "student.pt", teacher=guide)
    assert _kl_to(teacher, student, data) < untaught / 3
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in teacher.parameters())
