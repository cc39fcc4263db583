"""Models: fastai's head, parameter groups, freezing with train_bn, weights and their stats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cassava_pipeline.vision.learner import StageConfig, make_optimizer
from cassava_pipeline.vision.models import (
    WeightsError,
    create_model,
    freeze,
    no_decay_params,
    param_groups,
    unfreeze,
)
from cassava_pipeline.vision.schedule import discriminative_lrs


def test_resnet_head_and_three_groups():
    model, stats = create_model("resnet18", 5)
    head = model[1]
    kinds = [type(m).__name__ for m in head]
    assert kinds == [
        "AdaptiveConcatPool2d",
        "Flatten",
        "BatchNorm1d",
        "Dropout",
        "Linear",
        "ReLU",
        "BatchNorm1d",
        "Dropout",
        "Linear",
    ]
    assert head[2].num_features == 1024 and head[4].out_features == 512
    assert (head[3].p, head[7].p) == (0.25, 0.5)
    assert head[4].bias is None and torch.all(head[2].bias == 1e-3)
    assert len(param_groups(model)) == 3
    assert stats.mean == (0.485, 0.456, 0.406)
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_timm_packaged_lite0_offline():
    model, stats = create_model("tf_efficientnet_lite0", 3, "packaged")
    assert stats.mean == (0.5, 0.5, 0.5) and stats.std == (0.5, 0.5, 0.5)
    assert len(param_groups(model)) == 2
    # pretrained, not random: the stem's weights are the packaged file's
    from cassava_pipeline.vision.models import packaged_weights_file

    src = torch.load(packaged_weights_file(), weights_only=True)
    assert torch.equal(model[0].conv_stem.weight, src["_conv_stem.weight"])
    with pytest.raises(WeightsError, match="only for tf_efficientnet_lite0"):
        create_model("resnet18", 3, "packaged")


def test_frozen_body_keeps_batchnorm_trainable_and_changes_only_it():
    torch.manual_seed(0)
    model, _ = create_model("resnet18", 4)
    freeze(model)
    conv = model[0][0].weight
    bn = model[0][1].weight
    assert not conv.requires_grad and bn.requires_grad
    assert all(p.requires_grad for p in model[1].parameters())
    before_conv, before_bn = conv.detach().clone(), bn.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.equal(conv, before_conv)
    assert not torch.equal(bn, before_bn)
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_groups_get_discriminative_rates_and_no_decay_on_bn_and_bias():
    model, _ = create_model("resnet18", 4)
    lrs = discriminative_lrs((1e-6, 1e-4), len(param_groups(model)))
    opt = make_optimizer(model, lrs, StageConfig(name="t", epochs=1, lr=(1e-6, 1e-4)))
    # two optimizer groups per model group: with and without weight decay
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [1e-6, 1e-6, 1e-5, 1e-5, 1e-4, 1e-4]
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0] * 3
    no_wd = no_decay_params(model)
    for g in opt.param_groups:
        assert all((id(p) in no_wd) == (g["weight_decay"] == 0.0) for p in g["params"])
    assert id(model[0][1].weight) in no_wd  # a BatchNorm weight
    assert opt.defaults["eps"] == 1e-5 and opt.defaults["betas"] == (0.9, 0.99)


def test_weights_from_a_file(tmp_path: Path):
    model, _ = create_model("resnet18", 3)
    path = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, path)
    again, _ = create_model("resnet18", 3, str(path))
    assert torch.equal(again[1][4].weight, model[1][4].weight)
    with pytest.raises(WeightsError, match="neither"):
        create_model("resnet18", 3, str(tmp_path / "missing.pt"))
