#!/usr/bin/env bash
# Creates Cloud TPU VMs (one host or a pod slice), installs mim_jax on every
# worker, and runs / watches / relaunches training. See launch/README.md.
#   launch/tpu_vm.sh SUBCOMMAND [OPTIONS] [ARGS]      (launch/tpu_vm.sh -h)
set -euo pipefail
shopt -s inherit_errexit

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# On every worker (relative to the login user's home):
readonly R_CODE=mim_jax          # the checkout the trainer runs from
readonly R_VENV=mim_jax_venv     # the virtualenv (kept between installs)
readonly R_LOGS=mim_jax_logs     # <run>.log, <run>.pid, <run>.exit

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh SUBCOMMAND [OPTIONS] [ARGS]

subcommands:
  create                      create the TPU VM (needs --type)
  install                     put mim_jax on every worker: git clone (default)
                              or --copy of this checkout; venv ~/mim_jax_venv;
                              pip install "jax[tpu]" -r requirements.txt -e .
  run CONFIG WORKDIR [--config.key=value ...] [-- MORE_FLAGS]
                              start `python -m mim_jax.main` on every worker,
                              detached, MIM_JAX_DISTRIBUTED=1, log in
                              ~/mim_jax_logs/RUN.log on each worker
  tail                        tail -F the run log of one worker (--worker N)
  status                      VM state and health; if READY, the job state
                              on worker 0
  stop                        SIGTERM the trainer on every worker
  delete                      delete the VM (asks unless --yes)
  relaunch CONFIG WORKDIR [--config.key=value ...]
                              PREEMPTED/TERMINATED/missing VM: delete,
                              create, install, run. READY VM: nothing if the
                              job is running or finished, else run again
                              (install first if the VM has no mim_jax).
                              The trainer resumes from WORKDIR/checkpoints.

options (also read from the environment variable in brackets):
  --name NAME                 TPU VM name [TPU_NAME]                (all)
  --zone ZONE                 zone, e.g. us-central2-b [TPU_ZONE]   (all)
  --project PROJECT           GCP project [TPU_PROJECT]; default: gcloud's
  --type TYPE                 accelerator type, e.g. v4-8, v4-64, v5p-128
                              [TPU_TYPE] (create, relaunch; run uses it for
                              the local-workdir check)
  --runtime VERSION           TPU software version [TPU_RUNTIME]; default by
                              type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                              v5litepod/v5e v2-alpha-tpuv5-lite, else
                              tpu-ubuntu2204-base
  --spot | --preemptible      create a Spot / preemptible VM
  --repo URL                  git URL to clone [MIM_JAX_REPO]; default: the
                              'origin' remote of this checkout
  --ref REF                   branch, tag or commit to check out; default:
                              the repository's default branch
  --copy                      copy this checkout (tracked + untracked, not
                              git-ignored files) instead of cloning
  --run-name NAME             names the log/pid files; default: the last
                              component of WORKDIR (tail/status/stop:
                              default the most recent run)
  --allow-local-workdir       accept a WORKDIR that is not gs:// (single-host
                              VMs only; lost when the VM is deleted)
  --worker N                  worker for tail (default 0)
  --watch SECONDS             relaunch: check every SECONDS, relaunch when
                              preempted, exit 0 when the run has finished,
                              1 when it failed
  --yes                       delete without asking
  --dry-run                   print the gcloud commands instead of running
                              them (relaunch assumes a PREEMPTED VM)
  -h, --help                  this help

WORKDIR must be gs://... : a VM's disk is lost on preemption, and the hosts of
a pod share no disk. Multi-host rule: the number after the last '-' of the
type is > 8 (v4-16, v5p-16, v5litepod-16, v6e-16, ...).

examples:
  export TPU_NAME=mae-b TPU_ZONE=us-central2-b TPU_TYPE=v4-8
  launch/tpu_vm.sh create --spot
  launch/tpu_vm.sh install --repo https://github.com/ORG/mim_jax.git
  launch/tpu_vm.sh run configs/mae_vitb.py gs://BUCKET/mae_vitb \
      --config.input.tfds_data_dir=gs://BUCKET/tfds
  launch/tpu_vm.sh tail
  launch/tpu_vm.sh relaunch --spot --watch 600 configs/mae_vitb.py \
      gs://BUCKET/mae_vitb --config.input.tfds_data_dir=gs://BUCKET/tfds
EOF
}

die_usage() {  # exit 2: bad or missing arguments
  usage >&2
  echo >&2
  echo "error: $*" >&2
  exit 2
}

die() {
  echo "error: $*" >&2
  exit 1
}

note() {
  echo "==> $*" >&2
}

quote_args() {  # shell-quoted, space-separated
  local s
  printf -v s '%q ' "$@"
  printf '%s' "${s% }"
}

# ---------------------------------------------------------------- arguments

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
tpu_type="${TPU_TYPE:-}"
runtime="${TPU_RUNTIME:-}"
repo="${MIM_JAX_REPO:-}"
ref=""
run_name=""
worker=0
watch=""
provisioning=""
copy=0
allow_local=0
yes=0
dry_run=0
subcommand=""
positional=()
overrides=()
given=()  # options given on the command line, checked per subcommand

if [ "$#" -eq 0 ]; then
  die_usage "missing SUBCOMMAND"
fi

while [ "$#" -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    -h|--help)
      usage
      exit 0
      ;;
    --)
      overrides+=("$@")
      break
      ;;
    --config=*)
      die_usage "give the config file as the CONFIG argument, not $arg"
      ;;
    --config.*)
      overrides+=("$arg")
      ;;
    --name|--zone|--project|--type|--runtime|--repo|--ref|--run-name|\
    --worker|--watch)
      [ "$#" -gt 0 ] || die_usage "option $arg needs a value"
      set -- "$arg=$1" "${@:2}"
      continue
      ;;
    --name=*|--zone=*|--project=*|--type=*|--runtime=*|--repo=*|--ref=*|\
    --run-name=*|--worker=*|--watch=*)
      opt="${arg%%=*}"
      value="${arg#*=}"
      [ -n "$value" ] || die_usage "option $opt needs a non-empty value"
      given+=("$opt")
      case "$opt" in
        --name) name="$value" ;;
        --zone) zone="$value" ;;
        --project) project="$value" ;;
        --type) tpu_type="$value" ;;
        --runtime) runtime="$value" ;;
        --repo) repo="$value" ;;
        --ref) ref="$value" ;;
        --run-name) run_name="$value" ;;
        --worker) worker="$value" ;;
        --watch) watch="$value" ;;
      esac
      ;;
    --spot|--preemptible)
      [ -z "$provisioning" ] || [ "$provisioning" = "$arg" ] ||
        die_usage "use one of --spot and --preemptible, not both"
      provisioning="$arg"
      given+=("$arg")
      ;;
    --copy) copy=1; given+=("$arg") ;;
    --allow-local-workdir) allow_local=1; given+=("$arg") ;;
    --yes|-y) yes=1; given+=(--yes) ;;
    --dry-run) dry_run=1 ;;
    -*)
      die_usage "unknown option $arg"
      ;;
    *)
      if [ -z "$subcommand" ]; then
        subcommand="$arg"
      else
        positional+=("$arg")
      fi
      ;;
  esac
done

[ -n "$subcommand" ] || die_usage "missing SUBCOMMAND"

common="--name --zone --project"
case "$subcommand" in
  create) allowed="$common --type --runtime --spot --preemptible" ;;
  install) allowed="$common --repo --ref --copy" ;;
  run) allowed="$common --type --run-name --allow-local-workdir" ;;
  tail) allowed="$common --worker --run-name" ;;
  status|stop) allowed="$common --run-name" ;;
  delete) allowed="$common --yes" ;;
  relaunch)
    allowed="$common --type --runtime --spot --preemptible --repo --ref"
    allowed+=" --copy --run-name --allow-local-workdir --watch"
    ;;
  *) die_usage "unknown subcommand '$subcommand'" ;;
esac
for opt in "${given[@]+"${given[@]}"}"; do
  case " $allowed " in
    *" $opt "*) ;;
    *) die_usage "option $opt does not apply to '$subcommand'" ;;
  esac
done

case "$subcommand" in
  run|relaunch)
    [ "${#positional[@]}" -ge 1 ] ||
      die_usage "$subcommand: missing CONFIG (e.g. configs/mae_vitb.py)"
    [ "${#positional[@]}" -ge 2 ] ||
      die_usage "$subcommand: missing WORKDIR (e.g. gs://BUCKET/run)"
    [ "${#positional[@]}" -le 2 ] ||
      die_usage "$subcommand: unexpected argument '${positional[2]}'" \
        "(overrides look like --config.key=value)"
    ;;
  *)
    [ "${#positional[@]}" -eq 0 ] ||
      die_usage "$subcommand: unexpected argument '${positional[0]}'"
    [ "${#overrides[@]}" -eq 0 ] ||
      die_usage "$subcommand: unexpected argument '${overrides[0]}'"
    ;;
esac

[ -n "$name" ] || die_usage "missing --name (or TPU_NAME)"
[ -n "$zone" ] || die_usage "missing --zone (or TPU_ZONE)"
case "$name" in
  *[!a-z0-9-]*|-*)
    die_usage "--name '$name': use lowercase letters, digits and -" ;;
esac

type_hosts() {  # single | multi | unknown, from the type's trailing number
  local n="${1##*-}"
  case "$1" in
    *-*) ;;
    *) echo unknown; return ;;
  esac
  case "$n" in
    ''|*[!0-9]*) echo unknown ;;
    *) if [ "$n" -gt 8 ]; then echo multi; else echo single; fi ;;
  esac
}

if [ -n "$tpu_type" ] && [ "$(type_hosts "$tpu_type")" = unknown ]; then
  die_usage "--type '$tpu_type': expected GENERATION-COUNT, e.g. v4-8, v5p-128"
fi
case "$subcommand" in
  create|relaunch)
    [ -n "$tpu_type" ] || die_usage "$subcommand: missing --type (or TPU_TYPE)"
    ;;
esac
if [ "$copy" = 1 ]; then
  case " ${given[*]+"${given[*]}"} " in
    *" --repo "*|*" --ref "*)
      die_usage "--copy copies this checkout: drop --repo/--ref" ;;
  esac
fi
case "$worker" in
  ''|*[!0-9]*) die_usage "--worker '$worker': expected 0, 1, 2, ..." ;;
esac
if [ -n "$watch" ]; then
  case "$watch" in
    ''|*[!0-9]*|0)
      die_usage "--watch '$watch': expected a number of seconds > 0" ;;
  esac
fi

if [ "$copy" = 0 ] && [ -z "$repo" ] &&
   { [ "$subcommand" = install ] || [ "$subcommand" = relaunch ]; }; then
  repo="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null)" ||
    die_usage "$subcommand: missing --repo URL (or MIM_JAX_REPO): this" \
      "checkout has no 'origin' remote to default to; or use --copy"
fi

if [ -z "$runtime" ]; then
  case "$tpu_type" in
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    *) runtime=tpu-ubuntu2204-base ;;
  esac
fi

config=""
workdir=""
if [ "$subcommand" = run ] || [ "$subcommand" = relaunch ]; then
  config="${positional[0]}"
  workdir="${positional[1]}"
  case "$workdir" in
    gs://?*) ;;
    *)
      if [ "$allow_local" = 0 ]; then
        die_usage "WORKDIR '$workdir' is not a gs:// path: checkpoints on a" \
          "TPU VM's disk are lost on preemption and not shared by the hosts" \
          "of a pod. Use gs://BUCKET/DIR (or --allow-local-workdir on a" \
          "single-host VM)."
      fi
      case "$(type_hosts "${tpu_type:-unknown}")" in
        multi)
          die_usage "--type $tpu_type has more than one host: WORKDIR must" \
            "be a gs:// path that all hosts share, not '$workdir'"
          ;;
        unknown)
          echo "warning: no --type given; a local WORKDIR works only on a" \
            "single-host VM" >&2
          ;;
      esac
      ;;
  esac
  if [ ! -f "$REPO_ROOT/${config%%:*}" ]; then
    echo "warning: CONFIG '${config%%:*}' is not in this checkout; it must" \
      "exist in the code installed on the VM (relative to the repo root)" >&2
  fi
  if [ -z "$run_name" ]; then
    run_name="${workdir%/}"
    run_name="${run_name##*/}"
  fi
fi
if [ -n "$run_name" ]; then
  run_name="${run_name//[!A-Za-z0-9._-]/_}"
fi

# -------------------------------------------------------------------- gcloud

gcloud_tpu=(gcloud compute tpus tpu-vm)
location=(--zone="$zone")
[ -z "$project" ] || location+=(--project="$project")

gc() {  # run (or with --dry-run, print) a gcloud tpu-vm command
  if [ "$dry_run" = 1 ]; then
    echo "+ $(quote_args "${gcloud_tpu[@]}" "$@")"
    return 0
  fi
  "${gcloud_tpu[@]}" "$@"
}

ssh_workers() {  # ssh_workers WORKER REMOTE_SCRIPT
  gc ssh "$name" "${location[@]}" --worker="$1" --command="$2"
}

# Remote scripts: fixed text (quoted heredocs); user values only enter through
# the `printf %q` assignments that remote_vars puts in front.
remote_vars() {  # remote_vars VAR VALUE ... -> "VAR=quoted; ..." lines
  local out=""
  while [ "$#" -gt 0 ]; do
    out+="$1=$(printf '%q' "$2")"$'\n'
    shift 2
  done
  printf '%s' "$out"
}

remote_paths() {
  remote_vars code "$R_CODE" venv "$R_VENV" logs "$R_LOGS"
  # shellcheck disable=SC2016  # remote text: expands on the worker
  printf '%s\n' 'cd "$HOME"'
}

# Fails on a worker where any mim_jax run is alive (no exit code yet).
BUSY_CHECK="$(cat <<'EOF'
for p in "$logs"/*.pid; do
  [ -f "$p" ] && [ ! -f "${p%.pid}.exit" ] || continue
  if kill -0 "$(cat "$p")" 2>/dev/null; then
    echo "error: $(hostname): mim_jax run $(basename "$p" .pid) is" \
      "running (pid $(cat "$p")); stop it first: launch/tpu_vm.sh stop" >&2
    exit 1
  fi
done
EOF
)"
readonly BUSY_CHECK

INSTALL_BODY="set -euo pipefail
mkdir -p \"\$logs\"
$BUSY_CHECK
$(cat <<'EOF'
rm -rf "$code.new"
if [ "$mode" = git ]; then
  git clone --quiet "$repo" "$code.new"
  if [ -n "$ref" ]; then git -C "$code.new" checkout --quiet "$ref"; fi
else
  mkdir "$code.new"
  tar -xzf "$tarball" -C "$code.new"
  rm -f "$tarball"
fi
rm -rf "$code"
mv "$code.new" "$code"
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv --clear "$venv" || {
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv --clear "$venv"
  }
fi
. "$venv/bin/activate"
cd "$code"
python -m pip install -q -U pip
python -m pip install -q -U "jax[tpu]" -r requirements.txt -e .
jax_version=$(python -c 'import jax; print(jax.__version__)')
echo "$(hostname): mim_jax installed, jax $jax_version"
EOF
)"
readonly INSTALL_BODY

# The wrapper survives SIGTERM (trap) to write the trainer's exit code.
RUN_BODY="set -euo pipefail
mkdir -p \"\$logs\"
$BUSY_CHECK
$(cat <<'EOF'
log="$HOME/$logs/$run.log"
rm -f "$logs/$run.exit"
cd "$code"
echo "=== mim_jax launch $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname):" \
  "python -m mim_jax.main ${args[*]}" >> "$log"
export MIM_JAX_DISTRIBUTED=1
wrapper='trap : TERM; . "$HOME/$1/bin/activate"
python -m mim_jax.main "${@:3}"; echo $? > "$2"'
setsid nohup bash -c "$wrapper" bash "$venv" "$HOME/$logs/$run.exit" \
  "${args[@]}" >> "$log" 2>&1 < /dev/null &
echo "$!" > "$HOME/$logs/$run.pid"
echo "$(hostname): started run $run (pid $!), log ~/$logs/$run.log"
EOF
)"
readonly RUN_BODY

# Prints MIM_JAX_JOB=STATE for worker 0:
#   NOINSTALL | NONE | RUNNING | DONE | STOPPED (saved after SIGTERM) |
#   FAILED (non-zero exit) | DIED (gone without an exit code)
PROBE_BODY="$(cat <<'EOF'
# mim_jax job probe
if [ ! -x "$venv/bin/python" ] || [ ! -d "$code" ]; then
  echo MIM_JAX_JOB=NOINSTALL; exit 0
fi
if [ -z "$run" ]; then
  f=$(ls -t "$logs"/*.pid 2>/dev/null | head -n 1 || true)
  if [ -n "$f" ]; then run=$(basename "$f" .pid); fi
fi
if [ -z "$run" ] || [ ! -f "$logs/$run.pid" ]; then
  echo MIM_JAX_JOB=NONE; exit 0
fi
echo "MIM_JAX_RUN=$run"
if [ ! -f "$logs/$run.exit" ]; then
  if kill -0 "$(cat "$logs/$run.pid")" 2>/dev/null; then
    echo MIM_JAX_JOB=RUNNING
  else
    echo MIM_JAX_JOB=DIED
  fi
elif [ "$(cat "$logs/$run.exit")" != 0 ]; then
  echo MIM_JAX_JOB=FAILED
elif tac "$logs/$run.log" | sed "/^=== mim_jax launch/q" |
     grep -q "Preempted at step"; then
  echo MIM_JAX_JOB=STOPPED
else
  echo MIM_JAX_JOB=DONE
fi
EOF
)"
readonly PROBE_BODY

TAIL_BODY="$(cat <<'EOF'
if [ -z "$run" ]; then
  f=$(ls -t "$logs"/*.log 2>/dev/null | head -n 1 || true)
else
  f="$logs/$run.log"
fi
if [ -z "$f" ] || [ ! -f "$f" ]; then
  echo "error: $(hostname): no mim_jax log in ~/$logs${run:+ for run $run}" >&2
  exit 1
fi
echo "==> $(hostname):~/$f <=="
exec tail -n 200 -F "$f"
EOF
)"
readonly TAIL_BODY

STOP_BODY="$(cat <<'EOF'
for p in "$logs"/*.pid; do
  [ -f "$p" ] && [ ! -f "${p%.pid}.exit" ] || continue
  r=$(basename "$p" .pid)
  if [ -n "$run" ] && [ "$r" != "$run" ]; then continue; fi
  pid=$(cat "$p")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" &&
      echo "$(hostname): sent SIGTERM to run $r (pid $pid)"
  fi
done
EOF
)"
readonly STOP_BODY

# ---------------------------------------------------------------- subcommands

do_create() {
  local what="$tpu_type, $runtime"
  [ -z "$provisioning" ] || what+=", ${provisioning#--}"
  note "creating $name ($what) in $zone"
  local argv=(create "$name" "${location[@]}" --accelerator-type="$tpu_type"
              --version="$runtime")
  [ -z "$provisioning" ] || argv+=("$provisioning")
  gc "${argv[@]}"
}

make_tarball() {  # make_tarball OUT: tracked + untracked non-ignored files
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "--copy needs a git checkout: $REPO_ROOT is not one"
  (
    cd "$REPO_ROOT"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [ -f "$f" ]; then printf '%s\0' "$f"; fi
      done |
      tar -czf "$1" --null -T -
  )
}

do_install() {
  local mode=git tarball="" remote_tar=mim_jax_src.tar.gz tmp=""
  if [ "$copy" = 1 ]; then
    mode=copy
    tarball="<tarball of $REPO_ROOT>"
    if [ "$dry_run" = 0 ]; then
      tmp="$(mktemp -d)"
      tarball="$tmp/mim_jax_src.tar.gz"
    fi
    note "copying $REPO_ROOT to all workers of $name"
    if { [ "$dry_run" = 1 ] || make_tarball "$tarball"; } &&
       gc scp "$tarball" "$name:$remote_tar" "${location[@]}" --worker=all
    then
      rm -rf "$tmp"
    else
      rm -rf "$tmp"
      echo "error: copying the checkout to $name failed" >&2
      return 1
    fi
  else
    note "cloning $repo${ref:+ at $ref} on all workers of $name"
  fi
  note "installing on all workers of $name (venv ~/$R_VENV, jax[tpu])"
  ssh_workers all "$(remote_paths)
$(remote_vars mode "$mode" repo "$repo" ref "$ref" tarball "$remote_tar")
$INSTALL_BODY"
}

do_run() {
  local args=(--config="$config" --workdir="$workdir"
              "${overrides[@]+"${overrides[@]}"}")
  note "starting run $run_name on all workers of $name"
  ssh_workers all "$(remote_paths)
$(remote_vars run "$run_name")
args=($(quote_args "${args[@]}"))
$RUN_BODY"
}

# job_state sets $job: NOINSTALL|NONE|RUNNING|DONE|STOPPED|FAILED|DIED|UNKNOWN
job_state() {
  local out
  job=UNKNOWN
  if [ "$dry_run" = 1 ]; then
    ssh_workers 0 "$(remote_paths)
$(remote_vars run "$run_name")
$PROBE_BODY"
    return 0
  fi
  if ! out="$(ssh_workers 0 "$(remote_paths)
$(remote_vars run "$run_name")
$PROBE_BODY")"; then
    echo "warning: could not reach worker 0 of $name to check the job" >&2
    return 0
  fi
  out="$(printf '%s\n' "$out" | sed -n 's/^MIM_JAX_JOB=//p' | tail -n 1)"
  job="${out:-UNKNOWN}"
}

vm_state() {  # sets $state: the VM's state, MISSING (no such VM) or ERROR
  local out err
  state=UNKNOWN
  if [ "$dry_run" = 1 ]; then
    gc describe "$name" "${location[@]}" --format='value(state)'
    return 0
  fi
  err="$(mktemp)"
  if out="$("${gcloud_tpu[@]}" describe "$name" "${location[@]}" \
             --format='value(state)' 2>"$err")"; then
    state="${out:-UNKNOWN}"
  elif grep -qi 'not.found' "$err"; then
    state=MISSING
  else
    cat "$err" >&2
    echo "warning: gcloud describe failed for $name in $zone" >&2
    state=ERROR
  fi
  rm -f "$err"
}

do_status() {
  gc describe "$name" "${location[@]}" \
    --format='table(name.basename(),acceleratorType,state,health,'\
'healthDescription)'
  vm_state
  if [ "$state" = READY ] || [ "$dry_run" = 1 ]; then
    job_state
    [ "$dry_run" = 1 ] || echo "job${run_name:+ $run_name} on worker 0: $job"
  fi
}

do_tail() {
  ssh_workers "$worker" "$(remote_paths)
$(remote_vars run "$run_name")
$TAIL_BODY"
}

do_stop() {
  note "stopping ${run_name:-the mim_jax runs} on all workers of $name"
  ssh_workers all "$(remote_paths)
$(remote_vars run "$run_name")
$STOP_BODY"
}

do_delete() {
  if [ "$yes" = 0 ] && [ "$dry_run" = 0 ]; then
    [ -t 0 ] || die_usage "delete: stdin is not a terminal; pass --yes to" \
      "delete $name"
    local answer
    read -r -p "Delete TPU VM $name in $zone? [y/N] " answer
    case "$answer" in
      y|Y|yes|YES) ;;
      *) echo "not deleted" >&2; exit 1 ;;
    esac
  fi
  note "deleting $name in $zone"
  gc delete "$name" "${location[@]}" --quiet
}

steps() {  # steps FN ...: runs each in turn, fails at the first failure
  local fn
  for fn in "$@"; do
    "$fn" || return 1
  done
}

start() {  # start FN ...: sets $outcome to started, or retry when one failed
  if steps "$@"; then
    outcome="started"
  else
    outcome="retry"
  fi
}

relaunch_once() {  # sets $outcome: started|running|done|failed|retry|wait|...
  vm_state
  if [ "$dry_run" = 1 ]; then
    note "dry run: assuming $name is PREEMPTED"
    state=PREEMPTED
  fi
  note "$name: $state"
  case "$state" in
    MISSING) start do_create do_install do_run ;;
    PREEMPTED|TERMINATED) start do_delete do_create do_install do_run ;;
    READY)
      job_state
      note "job on worker 0: $job"
      case "$job" in
        RUNNING) outcome="running" ;;
        DONE) outcome="done" ;;
        UNKNOWN) outcome="unknown" ;;
        FAILED)
          if [ -n "$watch" ]; then outcome="failed"; else start do_run; fi
          ;;
        NOINSTALL) start do_install do_run ;;
        *) start do_run ;;  # NONE, STOPPED, DIED
      esac
      ;;
    *) outcome="wait" ;;  # CREATING, STARTING, REPAIRING, ..., ERROR
  esac
}

do_relaunch() {
  yes=1  # a PREEMPTED/TERMINATED VM is deleted without asking
  while true; do
    relaunch_once
    case "$outcome" in
      running) note "run $run_name is running on $name; nothing to do" ;;
      done) note "run $run_name has finished"; return 0 ;;
      failed)
        die "run $run_name failed; see: launch/tpu_vm.sh tail --name $name" \
          "--zone $zone"
        ;;
      started) note "run $run_name (re)started on $name" ;;
      retry) note "a gcloud step failed (see above)" ;;
      unknown) note "could not tell the state of run $run_name" ;;
      wait) note "$name is $state, not READY" ;;
    esac
    if [ -z "$watch" ] || [ "$dry_run" = 1 ]; then
      case "$outcome" in
        retry) die "relaunch of $name did not complete; run it again" ;;
        unknown) die "could not tell whether run $run_name is running" ;;
        wait) die "$name is $state, not READY; try again later" ;;
      esac
      return 0
    fi
    note "next check in $watch s"
    sleep "$watch"
  done
}

case "$subcommand" in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  tail) do_tail ;;
  status) do_status ;;
  stop) do_stop ;;
  delete) do_delete ;;
  relaunch) do_relaunch ;;
esac
