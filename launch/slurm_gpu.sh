#!/usr/bin/env bash
# Multi-node GPU runs of pdm_jax under SLURM: submits one batch job with one task per node;
# each task runs `python -m pdm_jax.main --distributed ...` with all of its node's GPUs, and
# jax.distributed.initialize() reads the coordinator and process ids from SLURM.
# `launch/slurm_gpu.sh --help` lists the settings.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROG=launch/slurm_gpu.sh
# shellcheck source=launch/common.sh
. "$REPO_ROOT/launch/common.sh"

usage() {
  cat <<'EOF'
launch/slurm_gpu.sh [--setting=value ...] -- PROGRAM_FLAGS

Submits (sbatch) a job of --nodes nodes with one task per node and --gpus_per_node GPUs
each; every task runs, from this checkout and with its venv,
    srun python -u -m MODULE [--distributed] PROGRAM_FLAGS
(MODULE pdm_jax.main gets --distributed). The job script goes to sbatch on stdin and the
job's settings on sbatch's command line, so nothing is written here but the log folder.
  launch/slurm_gpu.sh --nodes=4 --gpus_per_node=8 -- --config=configs/pdm.py:two_stream \
      --workdir=/shared/pdm --config.data.dir=/shared/coco_pdm --config.ckpt.init_from=/shared/uvit

Settings: a flag, or the environment variable in brackets; flags win.
  --nodes=N                [NODES]          number of nodes. Required.
  --gpus_per_node=G        [GPUS_PER_NODE]  GPUs per node. Required.
  --cpus_per_task=C        [CPUS_PER_TASK]  CPUs per task (data loading); default: SLURM's.
  --partition=P            [PARTITION]      default: the cluster's default partition.
  --account=A              [ACCOUNT]        default: your default account.
  --time=T                 [TIME_LIMIT]     wall-time limit, e.g. 2-00:00:00; default: the
                                            partition's.
  --job_name=NAME          [JOB_NAME]       default pdm_jax.
  --log_dir=DIR            [LOG_DIR]        job log folder (created); default workdir/slurm_logs,
                                            one file DIR/JOB_NAME-JOBID.log.
  --venv=DIR               [VENV]           venv activated on the nodes; default .venv of
                                            this checkout.
  --module=MODULE          [MODULE]         default pdm_jax.main (pdm_jax.benchmark ...).
  --env=KEY=VALUE                           environment for the run (repeatable).
  --term_before_end=S      [TERM_BEFORE_END] SIGTERM the tasks S seconds before the time
                                            limit, so that training saves a checkpoint;
                                            default 300, 0 turns it off.
  --dry_run                [DRY_RUN=1]      print the exact sbatch command and job script
                                            instead of submitting.

The checkout, the venv, the data and --workdir must be on a filesystem every node sees.
EOF
}

NODES=${NODES:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-}
CPUS_PER_TASK=${CPUS_PER_TASK:-}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
TIME_LIMIT=${TIME_LIMIT:-}
JOB_NAME=${JOB_NAME:-pdm_jax}
LOG_DIR=${LOG_DIR:-$REPO_ROOT/workdir/slurm_logs}
VENV=${VENV:-$REPO_ROOT/.venv}
MODULE=${MODULE:-pdm_jax.main}
TERM_BEFORE_END=${TERM_BEFORE_END:-300}
DRY_RUN=$(bool DRY_RUN "${DRY_RUN:-0}")
RUN_ENV=()
ARGS=()

while [ $# -gt 0 ]; do
  arg=$1
  shift
  case $arg in
    --) ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1; continue ;;
    --*) ;;
    *) die "unexpected argument '$arg'; settings are --name=value, and the program's flags go after --" ;;
  esac
  name=${arg#--}
  if [ "${name#*=}" != "$name" ]; then
    value=${name#*=}
    name=${name%%=*}
  else
    [ $# -gt 0 ] || die "--$name needs a value"
    value=$1
    shift
  fi
  case $name in
    nodes) NODES=$value ;;
    gpus_per_node) GPUS_PER_NODE=$value ;;
    cpus_per_task) CPUS_PER_TASK=$value ;;
    partition) PARTITION=$value ;;
    account) ACCOUNT=$value ;;
    time) TIME_LIMIT=$value ;;
    job_name) JOB_NAME=$value ;;
    log_dir) LOG_DIR=$value ;;
    venv) VENV=$value ;;
    module) MODULE=$value ;;
    env) RUN_ENV+=("$value") ;;
    term_before_end) TERM_BEFORE_END=$value ;;
    dry_run) die "--dry_run takes no value" ;;
    *) die "unknown flag --$name (--help lists the settings)" ;;
  esac
done

positive() {  # NAME VALUE FIX
  case $2 in
    '' | *[!0-9]* | 0) die "$1: $3" ;;
  esac
}
[ -n "$NODES" ] || die "no node count: pass --nodes=N or set NODES"
positive "--nodes=$NODES" "$NODES" "give a whole number of nodes, 1 or more"
[ -n "$GPUS_PER_NODE" ] || die "no GPU count: pass --gpus_per_node=G (e.g. 8) or set GPUS_PER_NODE"
positive "--gpus_per_node=$GPUS_PER_NODE" "$GPUS_PER_NODE" "give a whole number of GPUs, 1 or more"
[ -z "$CPUS_PER_TASK" ] || positive "--cpus_per_task=$CPUS_PER_TASK" "$CPUS_PER_TASK" "give a whole number of CPUs"
case $TERM_BEFORE_END in
  '' | *[!0-9]*) die "--term_before_end=$TERM_BEFORE_END: give seconds (0 turns it off)" ;;
esac
case $JOB_NAME in
  '' | *[!A-Za-z0-9._-]*) die "--job_name=$JOB_NAME: use letters, digits, '.', '_' and '-'" ;;
esac
check_module "$MODULE"
case $LOG_DIR in
  /*) ;;
  *) LOG_DIR=$PWD/$LOG_DIR ;;
esac
case $VENV in
  /*) ;;
  *) VENV=$PWD/$VENV ;;
esac
[ -f "$VENV/bin/activate" ] ||
  die "no venv at $VENV (no bin/activate): create it (python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . \"jax[cuda12]\") or pass --venv=DIR"
[ ${#ARGS[@]} -gt 0 ] || die "nothing to run: give the program's flags after --, e.g. $PROG --nodes=2 --gpus_per_node=8 -- --config=configs/pdm.py:two_stream --workdir=/shared/pdm"
for kv in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
  check_env "$kv"
done

sbatch=(
  sbatch --parsable
  "--job-name=$JOB_NAME"
  "--nodes=$NODES"
  --ntasks-per-node=1
  "--gpus-per-node=$GPUS_PER_NODE"
  "--output=$LOG_DIR/%x-%j.log"
)
[ -z "$CPUS_PER_TASK" ] || sbatch+=("--cpus-per-task=$CPUS_PER_TASK")
[ -z "$PARTITION" ] || sbatch+=("--partition=$PARTITION")
[ -z "$ACCOUNT" ] || sbatch+=("--account=$ACCOUNT")
[ -z "$TIME_LIMIT" ] || sbatch+=("--time=$TIME_LIMIT")
[ "$TERM_BEFORE_END" = 0 ] || sbatch+=("--signal=TERM@$TERM_BEFORE_END")

script="#!/usr/bin/env bash
set -euo pipefail
cd $(quote "$REPO_ROOT")
. $(quote "$VENV")/bin/activate"
if [ ${#RUN_ENV[@]} -gt 0 ]; then
  script="$script
$(export_lines "${RUN_ENV[@]}")"
fi
script="$script
srun --kill-on-bad-exit=1 $(program_line "$MODULE" "${ARGS[@]}")"
eof=PDM_JAX_SBATCH_SCRIPT
check_here_doc "$eof" "$script"

if [ "$DRY_RUN" = 1 ]; then
  echo "mkdir -p $(quote "$LOG_DIR")"
  echo "$(quote_all "${sbatch[@]}") <<'$eof'"
  printf '%s\n' "$script"
  echo "$eof"
  exit 0
fi
mkdir -p "$LOG_DIR"
echo "+ $(quote_all "${sbatch[@]}") <<'$eof' (the job script)" >&2
job=$(printf '%s\n' "$script" | "${sbatch[@]}")
job=${job%%;*}
echo "Submitted job $job: $NODES node(s) x $GPUS_PER_NODE GPU(s)."
echo "Log: $LOG_DIR/$JOB_NAME-$job.log   stop (SIGTERM, saves a checkpoint): scancel --signal=TERM $job"
