#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command runs on every host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* overrides]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/pdm.py:two_stream gs://bucket/pdm \
#       --config.data.dir=/mnt/coco_pdm --config.ckpt.init_from=gs://bucket/uvit
#
# Every host needs this repository at ~/pdm_jax with `pip install -e .` done, and the
# prepared data reachable at the same path (a bucket mount or a copy). WORKDIR should be a
# bucket so that all hosts see the same checkpoints.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/pdm_jax && . .venv/bin/activate && python -m pdm_jax.main --distributed \
   --config=$config --workdir=$workdir$extra"
