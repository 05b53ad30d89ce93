"""Attribution grids (paper Fig. 2): the most helpful and most harmful training images for test images."""

from __future__ import annotations

import torch

from .. import plots
from ..errors import ConfigError
from ..pipeline import Context
from ..registry import stage


def needs_class_images(ctx: Context) -> None:
    """The grids show images titled with their class names."""
    if not ctx.task.has_classes:
        raise ConfigError(f"stage attribution needs class labels: task={ctx.task.name} has none; drop it from stages")


@stage("attribution", precheck=needs_class_images)
def attribution_stage(ctx: Context) -> None:
    """Grid of the most helpful / harmful training images for (up to) 3 query test images (paper Fig. 2), at the
    first damping, with a caption saying what its titles mean (:func:`~influencelab.plots.attribution_caption`)."""
    if ctx.pairwise is None:  # a partition job
        return
    scores = ctx.pairwise[0]
    k = 3
    train, test = ctx.train_data, ctx.test_data
    names = train.classes
    helpful, harmful = [], []
    qpos = ctx.query_positions[:3]
    for i in range(len(qpos)):
        top = torch.argsort(scores[i], descending=True)
        rows = []
        for order in (top[:k], top.flip(0)[:k]):
            imgs = train.images(order)
            rows.append([(imgs[j], f"label {names[int(train.targets[t])]}"
                          + (f" (true {names[int(train.clean_targets[t])]})" if train.flipped[t] else ""),
                          float(scores[i, t])) for j, t in enumerate(order.tolist())])
        helpful.append(rows[0])
        harmful.append(rows[1])
    qimgs = test.images(qpos)
    labels = [names[int(test.targets[p])] for p in qpos]
    caption = plots.attribution_caption(ctx.solver.label, ctx.solver.dampings[0], len(train))  # the first damping's
    fig = plots.attribution_grid(qimgs, labels, helpful, harmful, ctx.dataset_spec.mean, ctx.dataset_spec.std,
                                 caption=caption)
    ctx.tracker.figure("attribution", fig)
