#!/usr/bin/env bash
# Cloud TPU VM pod slices for pdm_jax, from a laptop: create, set up, run, watch, stop, delete.
# Needs bash (3.2 or later), git and the gcloud CLI; pdm_jax itself need not be installed here.
# `launch/tpu_vm.sh --help` lists the commands and settings.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROG=launch/tpu_vm.sh
# shellcheck source=launch/common.sh
. "$REPO_ROOT/launch/common.sh"

usage() {
  cat <<'EOF'
launch/tpu_vm.sh COMMAND [--setting=value ...] [-- ARGS]

Drives `gcloud compute tpus tpu-vm` (and `queued-resources`) for a Cloud TPU VM slice;
every command that touches the workers runs on all of them at once (`--worker=all`).

Commands
  create   Create the slice: `tpu-vm create`, or with --queued_resource a
           `queued-resources create` request (its node has the same name).
  setup    On every worker: copy this repository (a `git archive` of HEAD sent with scp)
           or clone --repo_url; install Python (apt) when missing; a venv with
           `pip install -c constraints.txt -e . "jax[tpu]"`; with --gcs_bucket, mount the
           bucket with gcsfuse at --mount_point.
  run      Start `python -m MODULE ARGS` (MODULE pdm_jax.main gets --distributed) on every
           worker in the background (setsid nohup); one log per worker at
           ~/pdm_logs/RUN_NAME/HOSTNAME.log. Refused while an earlier run is still going.
             launch/tpu_vm.sh run -- --config=configs/pdm.py:two_stream --workdir=gs://b/pdm
  logs     Print the last --lines of one worker's log (--follow to keep following), or with
           --fetch=DIR copy every worker's logs to DIR/RUN_NAME/ (scp --worker=all).
  ssh      Open a shell on one worker, or run a command there: ssh [--worker=N] [-- CMD].
  stop     Send --signal (TERM: the run saves a checkpoint and exits) to the run on every
           worker; without --run_name, to every run started by `run`.
  delete   Delete the TPU VM (with --queued_resource: the queued resource and its node).
  status   Describe the TPU VM or the queued resource (state, workers).

Settings: a flag, or the environment variable in brackets; flags win. A flag given to a
command it does not apply to is an error.
  --tpu_name=NAME           [TPU_NAME]         the slice (and queued resource) name. Required.
  --zone=ZONE               [ZONE]             e.g. us-central2-b. Required.
  --project=PROJECT         [PROJECT]          default: gcloud's configured project.
  --dry_run                 [DRY_RUN=1]        print the exact commands instead of running them.
create
  --accelerator_type=TYPE   [ACCELERATOR_TYPE] v4-32, v5litepod-8, v5p-64, v6e-16 ... Required.
  --runtime_version=VER     [RUNTIME_VERSION]  default by generation: v2/v3/v4
                            tpu-ubuntu2204-base, v5litepod/v5e v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
  --queued_resource         [QUEUED_RESOURCE=1] also for delete and status.
  --spot                    [SPOT=1]           Spot VMs (can be preempted).
  --preemptible             [PREEMPTIBLE=1]    preemptible TPU (tpu-vm create only).
  --reserved                [RESERVED=1]       use the project's reservation.
setup
  --repo_url=URL            [REPO_URL]         git clone URL instead of copying local HEAD.
  --branch=BRANCH           [BRANCH]           branch or tag to clone (with --repo_url).
  --gcs_bucket=gs://B[/DIR] [GCS_BUCKET]       bucket (or a folder in it) to mount.
  --mount_point=PATH        [MOUNT_POINT]      absolute; default /mnt/gcs.
  --python=EXE              [REMOTE_PYTHON]    default python3.11 (apt-installed if missing).
  --remote_dir=DIR          [REMOTE_DIR]       code, relative to the home dir; default pdm_jax.
  --venv=DIR                [REMOTE_VENV]      venv, relative to the home dir; default
                                               pdm_jax_venv. Both also apply to run.
run, logs, ssh, stop, delete
  --run_name=NAME           [RUN_NAME]         run: default pdm-YYYYmmdd-HHMMSS (UTC);
                                               logs: default the newest run.
  --module=MODULE           [MODULE]           run: default pdm_jax.main (pdm_jax.benchmark ...).
  --env=KEY=VALUE                              run: environment for the run (repeatable).
  --worker=N|all            [WORKER]           run: default all; logs, ssh: default 0.
  --lines=N                                    logs: default 100.
  --follow                                     logs: keep printing new lines (tail -F).
  --fetch=DIR                                  logs: copy all workers' logs into DIR.
  --signal=TERM|INT|KILL                       stop: default TERM.
  --yes                                        delete: do not ask for confirmation.

Every worker needs the same data and workdir paths: use gs:// URLs (checkpoints) or the
gcsfuse mount (prepared data, --vae/--text_encoder files).
EOF
}

# execute CMD...: print it (dry run: to stdout, and stop there) or run it.
execute() {
  if [ "$DRY_RUN" = 1 ]; then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------
# Settings: environment first, flags override.
TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
QUEUED_RESOURCE=$(bool QUEUED_RESOURCE "${QUEUED_RESOURCE:-0}")
SPOT=$(bool SPOT "${SPOT:-0}")
PREEMPTIBLE=$(bool PREEMPTIBLE "${PREEMPTIBLE:-0}")
RESERVED=$(bool RESERVED "${RESERVED:-0}")
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-}
GCS_BUCKET=${GCS_BUCKET:-}
MOUNT_POINT=${MOUNT_POINT:-/mnt/gcs}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3.11}
REMOTE_DIR=${REMOTE_DIR:-pdm_jax}
REMOTE_VENV=${REMOTE_VENV:-pdm_jax_venv}
RUN_NAME=${RUN_NAME:-}
MODULE=${MODULE:-pdm_jax.main}
WORKER=${WORKER:-}
DRY_RUN=$(bool DRY_RUN "${DRY_RUN:-0}")
TAIL_LINES=100
FOLLOW=0
FETCH=""
SIGNAL=TERM
YES=0
RUN_ENV=()
ARGS=()
GIVEN=" "  # the flags given on the command line

given() { case $GIVEN in *" $1 "*) return 0 ;; esac; return 1; }

# The commands each flag applies to ("all": every command).
flag_commands() {
  case $1 in
    tpu_name | zone | project | dry_run) echo "all" ;;
    accelerator_type | runtime_version | spot | preemptible | reserved) echo "create" ;;
    queued_resource) echo "create delete status" ;;
    repo_url | branch | gcs_bucket | mount_point | python) echo "setup" ;;
    remote_dir | venv) echo "setup run" ;;
    run_name) echo "run logs stop" ;;
    module | env) echo "run" ;;
    worker) echo "run logs ssh" ;;
    lines | follow | fetch) echo "logs" ;;
    signal) echo "stop" ;;
    yes) echo "delete" ;;
    *) echo "" ;;
  esac
}

COMMAND=""
case ${1:-} in
  -h | --help | help)
    usage
    exit 0
    ;;
  create | setup | run | logs | ssh | stop | delete | status) COMMAND=$1 ;;
  '') die "no command given; one of create, setup, run, logs, ssh, stop, delete, status (--help)" ;;
  *) die "unknown command '$1'; one of create, setup, run, logs, ssh, stop, delete, status (--help)" ;;
esac
shift

while [ $# -gt 0 ]; do
  arg=$1
  shift
  case $arg in
    --) ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --*) ;;
    *) die "unexpected argument '$arg'; flags are --name=value, and the program's own flags go after --" ;;
  esac
  name=${arg#--}
  value=""
  has_value=0
  case $name in
    *=*) value=${name#*=}; name=${name%%=*}; has_value=1 ;;
  esac
  GIVEN="$GIVEN$name "
  applies=$(flag_commands "$name")
  [ -n "$applies" ] || die "unknown flag --$name (--help lists the settings)"
  case " $applies " in
    *" all "* | *" $COMMAND "*) ;;
    *) die "--$name does not apply to '$COMMAND' (it applies to: $applies)" ;;
  esac
  case $name in
    dry_run | queued_resource | spot | preemptible | reserved | follow | yes)
      [ "$has_value" = 0 ] || die "--$name takes no value"
      ;;
    *)
      if [ "$has_value" = 0 ]; then
        [ $# -gt 0 ] || die "--$name needs a value"
        value=$1
        shift
      fi
      ;;
  esac
  case $name in
    tpu_name) TPU_NAME=$value ;;
    zone) ZONE=$value ;;
    project) PROJECT=$value ;;
    dry_run) DRY_RUN=1 ;;
    accelerator_type) ACCELERATOR_TYPE=$value ;;
    runtime_version) RUNTIME_VERSION=$value ;;
    queued_resource) QUEUED_RESOURCE=1 ;;
    spot) SPOT=1 ;;
    preemptible) PREEMPTIBLE=1 ;;
    reserved) RESERVED=1 ;;
    repo_url) REPO_URL=$value ;;
    branch) BRANCH=$value ;;
    gcs_bucket) GCS_BUCKET=$value ;;
    mount_point) MOUNT_POINT=$value ;;
    python) REMOTE_PYTHON=$value ;;
    remote_dir) REMOTE_DIR=$value ;;
    venv) REMOTE_VENV=$value ;;
    run_name) RUN_NAME=$value ;;
    module) MODULE=$value ;;
    env) RUN_ENV+=("$value") ;;
    worker) WORKER=$value ;;
    lines) TAIL_LINES=$value ;;
    follow) FOLLOW=1 ;;
    fetch) FETCH=$value ;;
    signal) SIGNAL=$value ;;
    yes) YES=1 ;;
  esac
done

if [ ${#ARGS[@]} -gt 0 ]; then
  case $COMMAND in
    run | ssh) ;;
    *) die "'$COMMAND' takes no arguments after --" ;;
  esac
fi

# ---------------------------------------------------------------------------------------
# Validation: every problem named with its fix, before any gcloud call.
[ -n "$TPU_NAME" ] || die "no TPU name: pass --tpu_name=NAME or set TPU_NAME"
[ -n "$ZONE" ] || die "no zone: pass --zone=ZONE (e.g. us-central2-b) or set ZONE"

relative_dir() {  # NAME VALUE: a directory below the remote home
  case $2 in
    '' | /* | '~'* | . | .. | ../* | */.. | */../*)
      die "$1=$2: give a directory relative to the workers' home directory, e.g. pdm_jax"
      ;;
  esac
}

check_run_name() {
  case $RUN_NAME in
    *[!A-Za-z0-9._-]* | .*) die "--run_name=$RUN_NAME: use letters, digits, '.', '_' and '-' (not first '.')" ;;
  esac
}

case $COMMAND in
  create)
    [ -n "$ACCELERATOR_TYPE" ] || die "no accelerator type: pass --accelerator_type (e.g. v4-32, v5litepod-8, v5p-64) or set ACCELERATOR_TYPE"
    case $ACCELERATOR_TYPE in
      v[0-9]*-[0-9]*) ;;
      *) die "--accelerator_type=$ACCELERATOR_TYPE is not a TPU type such as v4-32, v5litepod-8 or v5p-64" ;;
    esac
    if [ -z "$RUNTIME_VERSION" ]; then
      case $ACCELERATOR_TYPE in
        v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
        v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
        v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
        v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
        *) die "no default runtime version for $ACCELERATOR_TYPE: pass --runtime_version (gcloud compute tpus tpu-vm versions list --zone=$ZONE)" ;;
      esac
    fi
    [ $((SPOT + PREEMPTIBLE + RESERVED)) -le 1 ] || die "--spot, --preemptible and --reserved exclude each other; pick one"
    if [ "$QUEUED_RESOURCE" = 1 ] && [ "$PREEMPTIBLE" = 1 ]; then
      die "queued resources take --spot, not --preemptible"
    fi
    ;;
  setup)
    relative_dir --remote_dir "$REMOTE_DIR"
    relative_dir --venv "$REMOTE_VENV"
    if [ -n "$BRANCH" ] && [ -z "$REPO_URL" ]; then
      die "--branch needs --repo_url (without it, setup copies this checkout's HEAD)"
    fi
    case $MOUNT_POINT in
      /?*) ;;
      *) die "--mount_point=$MOUNT_POINT: give an absolute path, e.g. /mnt/gcs" ;;
    esac
    case $REMOTE_PYTHON in
      '' | *[!A-Za-z0-9._/-]*) die "--python=$REMOTE_PYTHON: give an executable name or path, e.g. python3.11" ;;
    esac
    if [ -n "$GCS_BUCKET" ]; then
      bucket=${GCS_BUCKET#gs://}
      bucket=${bucket%/}
      case $bucket in
        '' | /*) die "--gcs_bucket=$GCS_BUCKET: give gs://BUCKET or gs://BUCKET/DIR" ;;
      esac
    fi
    ;;
  run)
    relative_dir --remote_dir "$REMOTE_DIR"
    relative_dir --venv "$REMOTE_VENV"
    [ -n "$RUN_NAME" ] || RUN_NAME=pdm-$(date -u +%Y%m%d-%H%M%S)
    check_run_name
    WORKER=${WORKER:-all}
    check_module "$MODULE"
    [ ${#ARGS[@]} -gt 0 ] || die "nothing to run: give the program's flags after --, e.g. $PROG run -- --config=configs/pdm.py:two_stream --workdir=gs://BUCKET/pdm"
    for kv in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
      check_env "$kv"
    done
    ;;
  logs)
    [ -z "$RUN_NAME" ] || check_run_name
    WORKER=${WORKER:-0}
    case $TAIL_LINES in
      '' | *[!0-9]*) die "--lines=$TAIL_LINES: give a number" ;;
    esac
    if [ -n "$FETCH" ]; then
      for name in worker lines follow; do
        ! given $name || die "--fetch copies every worker's whole logs; drop --$name"
      done
    fi
    ;;
  ssh)
    WORKER=${WORKER:-0}
    ;;
  stop)
    [ -z "$RUN_NAME" ] || check_run_name
    case $SIGNAL in
      TERM | INT | KILL) ;;
      *) die "--signal=$SIGNAL: use TERM (save and exit), INT or KILL" ;;
    esac
    ;;
esac

if [ -n "$WORKER" ]; then
  case $WORKER in
    all) ;;
    '' | *[!0-9]*) die "--worker=$WORKER: give a worker number (0, 1, ...) or all" ;;
  esac
  if [ "$WORKER" = all ] && { [ "$COMMAND" = logs ] || [ "$COMMAND" = ssh ]; }; then
    [ "$COMMAND" != logs ] || die "logs shows one worker: give --worker=N, or --fetch=DIR for all of them"
    [ "$COMMAND" != ssh ] || [ ${#ARGS[@]} -gt 0 ] || die "an interactive shell needs one worker: give --worker=N, or a command after --"
  fi
fi

# ---------------------------------------------------------------------------------------
LOCATION=(--zone="$ZONE")
[ -z "$PROJECT" ] || LOCATION+=(--project="$PROJECT")
TPU_VM=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

# on_workers WORKER REMOTE_SCRIPT: run the script with the workers' login shell (bash).
on_workers() {
  execute "${TPU_VM[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# Shell function for the workers: whether a pid is a live process (not gone, not a zombie).
# shellcheck disable=SC2016  # expanded on the workers
ALIVE='alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q "^Z"; }'

# The run's log files and pid files on each worker: ~/pdm_logs/RUN/HOSTNAME.{log,pid}.
run_glob() {
  if [ -n "$RUN_NAME" ]; then quote "$RUN_NAME"; else printf '*'; fi
}

cmd_create() {
  local tier=()
  [ "$SPOT" = 0 ] || tier+=(--spot)
  [ "$PREEMPTIBLE" = 0 ] || tier+=(--preemptible)
  [ "$RESERVED" = 0 ] || tier+=(--reserved)
  if [ "$QUEUED_RESOURCE" = 1 ]; then
    execute "${QR[@]}" create "$TPU_NAME" "${LOCATION[@]}" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      ${tier[@]+"${tier[@]}"}
    if [ "$DRY_RUN" = 0 ]; then
      echo "Queued. The node exists once the request is ACTIVE: $PROG status --queued_resource" >&2
    fi
  else
    execute "${TPU_VM[@]}" create "$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
      ${tier[@]+"${tier[@]}"}
  fi
}

cmd_setup() {
  local code_dir venv archive="" remote_archive=pdm_jax_src.tar.gz script sha
  code_dir=$(quote "$REMOTE_DIR")
  venv=$(quote "$REMOTE_VENV")
  if [ -z "$REPO_URL" ]; then
    git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null ||
      die "$REPO_ROOT is not a git checkout with a commit; pass --repo_url=URL to clone instead"
    sha=$(git -C "$REPO_ROOT" rev-parse --short=12 HEAD)
    if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
      echo "$PROG: warning: uncommitted changes are not copied; setup copies HEAD ($sha)" >&2
    fi
    archive="${TMPDIR:-/tmp}"
    archive="${archive%/}/pdm_jax_src-$sha.tar.gz"
    SETUP_ARCHIVE=$archive  # removed on exit, also when a step fails
    [ "$DRY_RUN" = 1 ] || trap 'rm -f "$SETUP_ARCHIVE"' EXIT
    execute git -C "$REPO_ROOT" archive --format=tar.gz --output="$archive" HEAD
    execute "${TPU_VM[@]}" scp "$archive" "$TPU_NAME:$remote_archive" "${LOCATION[@]}" --worker=all
    execute rm -f "$archive"
  fi
  script="set -euo pipefail
cd \"\$HOME\"
if ! command -v $(quote "$REMOTE_PYTHON") >/dev/null; then
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(quote "$REMOTE_PYTHON") $(quote "$(basename "$REMOTE_PYTHON")-venv")
fi
rm -rf $code_dir"
  if [ -z "$REPO_URL" ]; then
    script="$script
mkdir -p $code_dir
tar -xzf $remote_archive -C $code_dir
rm -f $remote_archive"
  else
    script="$script
git clone --depth=1 $(if [ -n "$BRANCH" ]; then printf -- '--branch=%s ' "$(quote "$BRANCH")"; fi)$(quote "$REPO_URL") $code_dir"
  fi
  script="$script
$(quote "$REMOTE_PYTHON") -m venv $venv
. $venv/bin/activate
cd $code_dir
pip install -q --upgrade pip
pip install -q -c constraints.txt -e . \"jax[tpu]\"
echo \"\$(hostname): pdm_jax ready, jax \$(python -c \"import jax, pdm_jax; print(jax.__version__)\")\""
  if [ -n "$GCS_BUCKET" ]; then
    local bucket only_dir="" mount
    bucket=${GCS_BUCKET#gs://}
    bucket=${bucket%/}
    case $bucket in
      */*) only_dir=${bucket#*/}; bucket=${bucket%%/*} ;;
    esac
    mount=$(quote "$MOUNT_POINT")
    script="$script
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcsfuse
fi
sudo mkdir -p $mount
sudo chown \"\$(id -u):\$(id -g)\" $mount
if ! mountpoint -q $mount; then
  gcsfuse --implicit-dirs $(if [ -n "$only_dir" ]; then printf -- '--only-dir=%s ' "$(quote "$only_dir")"; fi)$(quote "$bucket") $mount
fi
echo \"\$(hostname): mounted\" $(quote "gs://$bucket${only_dir:+/$only_dir} at $MOUNT_POINT")"
  fi
  on_workers all "$script"
}

cmd_run() {
  local script outer eof=PDM_JAX_RUN_SCRIPT
  # The worker's run script, written there verbatim through a quoted here-document.
  script=". $(quote "$REMOTE_VENV")/bin/activate
cd $(quote "$REMOTE_DIR")"
  if [ ${#RUN_ENV[@]} -gt 0 ]; then
    script="$script
$(export_lines "${RUN_ENV[@]}")"
  fi
  script="$script
exec $(program_line "$MODULE" "${ARGS[@]}")"
  check_here_doc "$eof" "$script"
  outer="set -eu
cd \"\$HOME\"
$ALIVE
for pid_file in pdm_logs/*/*.pid; do
  if [ -f \"\$pid_file\" ] && alive \"\$(cat \"\$pid_file\")\"; then
    echo \"\$(hostname): a run is still going (~/\$pid_file); stop it first: $PROG stop\" >&2
    exit 1
  fi
done
log_dir=pdm_logs/$RUN_NAME
host=\$(hostname)
mkdir -p \"\$log_dir\"
cat >\"\$log_dir/\$host.sh\" <<'$eof'
$script
$eof
setsid nohup bash \"\$log_dir/\$host.sh\" >>\"\$log_dir/\$host.log\" 2>&1 </dev/null &
echo \$! >\"\$log_dir/\$host.pid\"
echo \"\$host: started $RUN_NAME (pid \$!), log ~/\$log_dir/\$host.log\""
  on_workers "$WORKER" "$outer"
  if [ "$DRY_RUN" = 0 ]; then
    echo "Logs: $PROG logs --run_name=$RUN_NAME [--worker=N] [--follow]; stop: $PROG stop --run_name=$RUN_NAME" >&2
  fi
}

cmd_logs() {
  if [ -n "$FETCH" ]; then
    local source=pdm_logs
    [ -z "$RUN_NAME" ] || source="pdm_logs/$RUN_NAME"
    execute mkdir -p "$FETCH"
    execute "${TPU_VM[@]}" scp --recurse "$TPU_NAME:$source" "$FETCH" "${LOCATION[@]}" --worker=all
    return
  fi
  local follow=""
  [ "$FOLLOW" = 0 ] || follow=" -F"
  on_workers "$WORKER" "set -eu
cd \"\$HOME\"
log=\$(ls -t pdm_logs/$(run_glob)/*.log 2>/dev/null | head -n 1 || true)
if [ -z \"\$log\" ]; then
  echo \"\$(hostname): no log under ~/pdm_logs/$(run_glob)\" >&2
  exit 1
fi
echo \"==> \$(hostname):~/\$log <==\"
exec tail -n $TAIL_LINES$follow \"\$log\""
}

cmd_ssh() {
  if [ ${#ARGS[@]} -gt 0 ]; then
    on_workers "$WORKER" "${ARGS[*]}"
  else
    execute "${TPU_VM[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$WORKER"
  fi
}

cmd_stop() {
  on_workers all "set -eu
cd \"\$HOME\"
stopped=0
$ALIVE
for pid_file in pdm_logs/$(run_glob)/*.pid; do
  [ -f \"\$pid_file\" ] || continue
  pid=\$(cat \"\$pid_file\")
  if alive \"\$pid\"; then
    kill -s $SIGNAL -- \"-\$pid\"
    echo \"\$(hostname): sent SIG$SIGNAL to ~/\$pid_file (process group \$pid)\"
    stopped=1
  fi
done
[ \"\$stopped\" = 1 ] || echo \"\$(hostname): nothing running under ~/pdm_logs/$(run_glob)\""
}

cmd_delete() {
  local quiet=()
  [ "$YES" = 0 ] || quiet=(--quiet)
  if [ "$QUEUED_RESOURCE" = 1 ]; then
    execute "${QR[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --force ${quiet[@]+"${quiet[@]}"}
  else
    execute "${TPU_VM[@]}" delete "$TPU_NAME" "${LOCATION[@]}" ${quiet[@]+"${quiet[@]}"}
  fi
}

cmd_status() {
  if [ "$QUEUED_RESOURCE" = 1 ]; then
    execute "${QR[@]}" describe "$TPU_NAME" "${LOCATION[@]}"
  else
    execute "${TPU_VM[@]}" describe "$TPU_NAME" "${LOCATION[@]}"
  fi
}

"cmd_$COMMAND"
