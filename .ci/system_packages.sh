#!/usr/bin/env bash
# Debian packages the launcher tests run for real (tests/launch/test_launch.py):
#   openmpi-bin, libopenmpi-dev  mpirun and the libmpi that mpi4py loads (and builds against)
#   slurm-wlm                    slurmctld, slurmd and the client commands (sbatch, srun, ...);
#                                its basic plugins include mpi/pmix for `srun --mpi=pmix`
#   munge                        SLURM's authentication; the tests start their own munged
# Idempotent: installs only what is missing. Needs root (CI runs it as root).
set -euo pipefail
packages=(openmpi-bin libopenmpi-dev slurm-wlm slurm-wlm-basic-plugins munge)
need=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    need+=("$package")
  fi
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Containers have no init system: keep the packages' scripts from starting daemons of their own
  # (the tests start munged, slurmctld and slurmd themselves, on private sockets and ports).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
for tool in mpirun munged slurmctld slurmd sbatch srun; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
