"""The private SLURM cluster fixture, for every test in this folder."""

from slurm_cluster import slurm_cluster  # noqa: F401  (a fixture: pytest finds it here)
