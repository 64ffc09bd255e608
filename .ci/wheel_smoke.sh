#!/usr/bin/env bash
# CI: what a non-editable `pip install .` gives a user. The editable install that the tests use
# reads data straight from the checkout, so it cannot notice files a wheel leaves out (the
# shipped search spaces, the embedded models). Builds the wheel, installs it into a fresh venv
# and runs the main job and text_box mode, one short trial each, from an empty folder.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# The wheel, as `pip install .` builds it (isolated build), from a copy of the source: setuptools
# writes build/ and *.egg-info beside the sources it builds.
mkdir "$work/src"
tar -cf - --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./results \
    --exclude='*.egg-info' --exclude=__pycache__ . | tar -xf - -C "$work/src"
.venv/bin/pip wheel -q --no-deps -w "$work/dist" "$work/src"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$work/venv/bin/pip" install -q "$work"/dist/angiotune-*.whl

# Nothing of the checkout is reachable from here: not the working directory, not sys.path.
mkdir "$work/run" && cd "$work/run"
export ANGIOTUNE_SALT=wheel-smoke RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1
bin=$work/venv/bin
"$bin/python" - "$repo" <<'EOF'
import sys
from pathlib import Path

import angiotune
from angiotune.search.space import SPACES_DIR

repo = Path(sys.argv[1]).resolve()
for path in (Path(angiotune.__file__), SPACES_DIR):
    assert not path.resolve().is_relative_to(repo), f"{path} comes from the checkout"
EOF
"$bin/angiotune" phantoms data --lesions 24 --frames 2 --size 256 --tidy >/dev/null
"$bin/angiotune" index data/manifest.csv --out data/index.parquet >/dev/null
# One trial of one epoch cannot be expected to beat the zero-shot base: keep it anyway, so that
# the registry is written and read too.
tiny=(--data data/index.parquet --set samples=1 --set epochs=1 --set asha=off
      --keep-below-zero-shot)
"$bin/angiotune" search --space lora_rank.yaml "${tiny[@]}"
"$bin/angiotune" search --space text_box.yaml "${tiny[@]}"
"$bin/angiotune" best --all
echo "wheel smoke passed in $((SECONDS - start)) s"
