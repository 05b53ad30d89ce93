#!/usr/bin/env bash
# Leave-one-out retraining vs prediction (Koh & Liang style) on digits.
set -euo pipefail
influencelab experiment=loo "$@"
