#!/usr/bin/env bash
# Paper Fig. 2: most helpful / harmful training images for test images, MNIST and FashionMNIST, CNN + EK-FAC.
# MNIST needs its IDX files under data/MNIST/raw/ (or dataset.download=true with internet).
set -euo pipefail
influencelab -m experiment=attribution dataset=fashion_mnist,mnist "$@"
