#!/usr/bin/env bash
# Paper Fig. 3: mislabel detection by self-influence on FashionMNIST (20,000 points, 10% flipped), both regimes,
# for EK-FAC, K-FAC and identity (gradient norm) beside the loss and random baselines; LiSSA on a subsample.
set -euo pipefail
influencelab -m experiment=mislabel,mislabel_memorize solver=ekfac,kfac,identity "$@"
influencelab -m experiment=mislabel,mislabel_memorize solver=lissa dataset.subset=2000 "$@"
# Needs downloads / GPU (not run here): Flowers102 and Food101 with pretrained ResNet-50 and ViT-B/16.
# influencelab -m experiment=mislabel_flowers102,mislabel_food101 model=resnet50,vit_b16
