"""Model builders named by ``conf/model/*.yaml`` (``_target_``).

Every builder takes ``num_classes`` (the number of outputs: classes, or target values for regression),
``in_chans`` and ``image_size`` (interpolated from the dataset config, so input adaptation is explicit) and
raises a one-line ``ConfigError`` for an input it cannot take. ``mlp`` and ``linear`` also take ``in_features``: a
tabular dataset's feature-vector length (``dataset.in_features``; ``null`` for images, which are flattened), the
image models refuse such a dataset. ResNets and ViT come from timm: ``in_chans=1`` adapts the stem (pretrained RGB
weights are summed over channels by timm), ``img_size`` sets the ViT patch grid.
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError, check


def _width(in_chans: int | None, image_size: int | None, in_features: int | None) -> int:
    """Input width after flattening: ``in_features`` (feature vectors) or ``in_chans x image_size²`` (images)."""
    if in_features is not None:
        check(isinstance(in_features, int) and in_features >= 1, "dataset.in_features", in_features,
              "must be a positive integer")
        return in_features
    check(image_size is not None and in_chans is not None, "dataset.in_features", in_features,
          "the dataset gives neither images (image_size, channels) nor feature vectors")
    return in_chans * image_size * image_size


def _needs_images(model: str, image_size: int | None) -> None:
    if image_size is None:
        raise ConfigError(f"model={model} needs images: the dataset gives feature vectors (dataset.image_size=null); "
                          f"use model=mlp or model=linear")


def linear(num_classes: int, in_chans: int | None, image_size: int | None, in_features: int | None = None
           ) -> nn.Module:
    """Multinomial logistic (or, with task=regression, linear) regression (flatten -> Linear): the convex model,
    with trainer.weight_decay as L2."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_width(in_chans, image_size, in_features), num_classes))


def mlp(num_classes: int, in_chans: int | None, image_size: int | None, hidden: int = 32, depth: int = 1,
        activation: str = "tanh", in_features: int | None = None) -> nn.Module:
    """A tiny MLP (flatten -> [Linear -> act] x depth -> Linear): for tests and exact references."""
    check(hidden >= 1, "model.hidden", hidden, "must be >= 1")
    check(activation in ("tanh", "relu"), "model.activation", activation, "use tanh or relu")
    act = nn.Tanh if activation == "tanh" else nn.ReLU
    layers: list[nn.Module] = [nn.Flatten()]
    width = _width(in_chans, image_size, in_features)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(num_classes: int, in_chans: int, image_size: int, channels: tuple[int, int] = (16, 32),
        hidden: int = 64) -> nn.Module:
    """The paper's small 2-conv CNN: [conv3x3 -> ReLU -> maxpool2] x 2 -> Linear -> ReLU -> Linear."""
    _needs_images("cnn", image_size)
    check(image_size >= 4, "dataset.image_size", image_size, "model=cnn needs images of at least 4x4")
    c1, c2 = channels
    side = image_size // 2 // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
    )


def timm_model(arch: str, num_classes: int, in_chans: int, image_size: int, pretrained: bool = False,
               patch_size: int | None = None, drop_rate: float = 0.0) -> nn.Module:
    """A timm model (resnet18, resnet50, vit_base_patch16_224, ...) adapted to the dataset's input."""
    import timm

    _needs_images(arch, image_size)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    if patch_size is not None:  # a ViT: the patch grid must tile the image
        check(image_size % patch_size == 0, "dataset.image_size", image_size,
              f"{arch} needs a multiple of its patch size {patch_size}; set dataset.image_size="
              f"{max(patch_size, (image_size + patch_size - 1) // patch_size * patch_size)} (or 224)")
        kwargs["img_size"] = image_size
    else:
        check(image_size >= 8, "dataset.image_size", image_size, f"{arch} needs images of at least 8x8")
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as e:  # no network / no cached weights: one clear line
        if pretrained:
            raise ConfigError(f"model.pretrained=true for {arch}: weights could not be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); put them in the Hugging Face cache "
                              f"(HF_HOME) or use model.pretrained=false") from None
        raise
