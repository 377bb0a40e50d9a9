#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all local GPUs per process.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/pdm.py:two_stream /shared/pdm \
#       --config.data.dir=/shared/coco_pdm --config.ckpt.init_from=/shared/uvit
#
# jax.distributed.initialize() reads the SLURM environment (coordinator, process ids).
#SBATCH --ntasks-per-node=1
set -euo pipefail
config=${1:?config, e.g. configs/pdm.py:two_stream}
workdir=${2:?workdir on a shared filesystem}
shift 2
srun python -m pdm_jax.main --distributed --config="$config" --workdir="$workdir" "$@"
