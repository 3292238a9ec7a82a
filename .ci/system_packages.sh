#!/usr/bin/env bash
# Debian packages for the launcher tests: OpenMPI (mpirun, mpi4py's libmpi), SLURM and munge.
set -euo pipefail
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
