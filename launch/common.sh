# shellcheck shell=bash
# Shared by launch/tpu_vm.sh and launch/slurm_gpu.sh, which source it after setting PROG.
# Plain bash 3.2 (macOS): no associative arrays, no ${x,,}, empty arrays guarded.

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# quote WORD: WORD as one word for a POSIX shell, left bare when that is already safe.
quote() {
  local word=$1 sq="'" esc="'\\''"
  case $word in
    '' | *[!A-Za-z0-9_./:=,@%+-]*) printf "'%s'" "${word//$sq/$esc}" ;;
    *) printf '%s' "$word" ;;
  esac
}

# quote_all WORD...: the words quoted and joined with spaces; a flag's value is quoted on
# its own (--name='a b', the same word as '--name=a b').
quote_all() {
  local word out="" name
  for word in "$@"; do
    case $word in
      -*=*)
        name=${word%%=*}
        case $name in
          *[!A-Za-z0-9_./:,@%+-]*) word=$(quote "$word") ;;
          *) word="$name=$(quote "${word#*=}")" ;;
        esac
        ;;
      *) word=$(quote "$word") ;;
    esac
    out="$out${out:+ }$word"
  done
  printf '%s' "$out"
}

# bool NAME VALUE: 1 or 0 from an environment variable's value.
bool() {
  case $2 in
    1 | true | True | TRUE | yes | on) echo 1 ;;
    0 | false | False | FALSE | no | off | '') echo 0 ;;
    *) die "$1=$2: use 1 or 0" ;;
  esac
}

# check_module MODULE: a dotted Python module name.
check_module() {
  case $1 in
    '' | [!A-Za-z_]* | *[!A-Za-z0-9_.]*) die "--module=$1 is not a Python module name such as pdm_jax.main" ;;
  esac
}

# check_env KEY=VALUE: one --env setting.
check_env() {
  case ${1%%=*} in
    '' | [!A-Za-z_]* | *[!A-Za-z0-9_]*) die "--env=$1: use --env=KEY=VALUE with KEY a variable name" ;;
  esac
  [ "${1#*=}" != "$1" ] || die "--env=$1: use --env=KEY=VALUE with KEY a variable name"
}

# export_lines KEY=VALUE...: one `export KEY=VALUE` line (value quoted) per setting.
export_lines() {
  local kv
  for kv in "$@"; do
    printf 'export %s=%s\n' "${kv%%=*}" "$(quote "${kv#*=}")"
  done
}

# program_line MODULE ARG...: `python -u -m MODULE ARG...`, quoted; pdm_jax.main gets
# --distributed unless the arguments already set it.
program_line() {
  local module=$1 distributed=()
  shift
  if [ "$module" = pdm_jax.main ]; then
    case " $* " in
      *" --distributed "* | *" --nodistributed "* | *" --distributed="*) ;;
      *) distributed=(--distributed) ;;
    esac
  fi
  quote_all python -u -m "$module" ${distributed[@]+"${distributed[@]}"} "$@"
}

# check_here_doc EOF TEXT: TEXT can go into a here-document that ends at a line EOF.
check_here_doc() {
  case "
$2
" in
    *"
$1
"*) die "an argument contains a line '$1', which would end the generated script" ;;
  esac
}
