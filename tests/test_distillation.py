"""Stage 2's detection distillation: weighting the anchors by the teacher's confidence makes a missed item count."""
from __future__ import annotations

import torch

from codec.train import detection_class_kl, detection_distillation


def _teacher(anchors: int = 1344, classes: int = 10) -> dict:
    gen = torch.Generator().manual_seed(0)
    scores = torch.full((1, classes, anchors), -8.0)  # background everywhere ...
    scores[0, 3, 100] = 4.0  # ... but one item
    return {"scores": scores, "boxes": torch.rand(1, 4, anchors, generator=gen) * 3}


def test_teacher_weighting_sees_a_missed_item_that_the_uniform_mean_hides():
    teacher = _teacher()
    # A misses the item: its anchor says background and its box is off; everything else is exact
    missed = {k: v.clone() for k, v in teacher.items()}
    missed["scores"][0, 3, 100] = -8.0
    missed["boxes"][0, :, 100] += 2.0
    # B finds the item exactly, but every background anchor's box is a little off (boxes nobody will see)
    noisy = {k: v.clone() for k, v in teacher.items()}
    noisy["boxes"] += 0.3
    noisy["boxes"][0, :, 100] = teacher["boxes"][0, :, 100]

    assert detection_distillation(missed, teacher, "uniform") < detection_distillation(noisy, teacher, "uniform")
    assert detection_distillation(missed, teacher, "teacher") > 10 * detection_distillation(noisy, teacher, "teacher")
    exact = detection_distillation({k: v.clone() for k, v in teacher.items()}, teacher, "teacher")
    assert exact < detection_distillation(noisy, teacher, "teacher")


def test_teacher_weighting_pulls_harder_on_the_missed_item():
    teacher = _teacher()
    grads = {}
    for weight in ("uniform", "teacher"):
        student = {k: v.clone() for k, v in teacher.items()}
        student["scores"][0, 3, 100] = -8.0
        student = {k: v.requires_grad_(True) for k, v in student.items()}
        detection_distillation(student, teacher, weight).backward()
        grads[weight] = float(student["scores"].grad[0, 3, 100])
    assert grads["uniform"] < 0 and grads["teacher"] < 0  # both raise the item's score ...
    assert grads["teacher"] < 10 * grads["uniform"]  # ... the weighted loss more than 10x as hard


def test_class_kl_counts_the_item_class_not_the_background():
    teacher = _teacher()["scores"]
    teacher[0, 5, 100] = 1.0  # the item: class 3 first, class 5 second
    exact = detection_class_kl(teacher.clone(), teacher)
    swapped = teacher.clone()  # names the item's garment wrong: class 5 first
    swapped[0, 3, 100], swapped[0, 5, 100] = 1.0, 4.0
    background = teacher.clone()  # every background anchor's class ranking scrambled, the item exact
    background[0, :, :100] = torch.randn(10, 100, generator=torch.Generator().manual_seed(1))
    assert float(exact) < 1e-6
    assert detection_class_kl(swapped, teacher) > 10 * detection_class_kl(background, teacher)


def test_class_kl_raises_the_teachers_class_at_the_item():
    teacher = _teacher()["scores"]
    student = teacher.clone()
    student[0, 3, 100], student[0, 5, 100] = 1.0, 4.0
    student.requires_grad_(True)
    detection_class_kl(student, teacher).backward()
    assert float(student.grad[0, 3, 100]) < 0 < float(student.grad[0, 5, 100])
