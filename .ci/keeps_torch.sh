#!/usr/bin/env bash
# A GPU container user's install: a venv that already has a torch, then one `pip install -e .`.
# Fails unless that torch is kept (same version, files untouched) and `pip check` is clean.
# Usage: keeps_torch.sh VENV WHEELHOUSE, on a venv that has the project's dependencies (CI: the
# Python 3.12 leg's, once its tests are done; a fresh venv would unpack torch's 3 GB of CUDA
# wheels again for the same question). Everything comes from the wheelhouse at the versions of
# .ci/constraints-py312.txt, torch left free: the check asks whether pip keeps the torch it
# finds, and CI's answer does not change with the registry's newest releases.
set -euo pipefail
venv=$(realpath "$1")
wheels=$(realpath "$2")
cd "$(dirname "$0")/.."
others=$(mktemp)
trap 'rm -f "$others"' EXIT
# A reinstall of the same version would show as a new file: compare its inode and mtime too.
torch_of() {
  "$venv/bin/python" -W ignore -c 'import os, torch
stat = os.stat(torch.__file__)
print(torch.__version__, stat.st_ino, stat.st_mtime_ns)'
}
before=$(torch_of)
grep -v '^torch==' .ci/constraints-py312.txt > "$others"
"$venv/bin/pip" install --quiet --no-index --find-links "$wheels" -c "$others" -e .
after=$(torch_of)
if [ "$before" != "$after" ]; then
  echo "pip install -e . replaced torch: $before -> $after" >&2
  exit 1
fi
"$venv/bin/pip" check
echo "pip install -e . kept torch $before"
