#!/usr/bin/env bash
# Runs mim_jax on N fake CPU devices (default 8): the sharded code path of a
# TPU host, on a laptop.
#   launch/local_cpu.sh [-n DEVICES] CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail

usage() {
  echo "usage: $0 [-n DEVICES] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
}

devices=8
while getopts "n:h" opt; do
  case "$opt" in
    n) devices="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ "$#" -ge 2 ] || usage
case "$devices" in
  ''|*[!0-9]*) echo "error: -n needs a positive integer, got '$devices'" >&2; exit 2 ;;
esac
config="$1"
workdir="$2"
shift 2
[ -f "${config%%:*}" ] || { echo "error: config file '${config%%:*}' not found" >&2; exit 2; }

export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS=cpu
exec python -m mim_jax.main --config="$config" --workdir="$workdir" "$@"
