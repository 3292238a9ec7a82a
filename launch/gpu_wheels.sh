#!/usr/bin/env bash
# Here, with the package registries: fetch into .whl/ what the GPU image lacks (its python3 is
# 3.12 with PyTorch; nothing can be downloaded there). launch/gpu_session.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
          --implementation cp "${platforms[@]}" -d .whl "$@"; }
get megatron-core==0.16.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl  # published as source only
