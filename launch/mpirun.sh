#!/usr/bin/env bash
# Runs tern on N processes of this machine: launch/mpirun.sh N train RECIPE [--set ...]
# Sets what OpenMPI needs as root, without ssh, and with more ranks than cores; places ranks by
# slot (consecutive ranks on one node, so tensor-parallel groups stay inside it). With a cuda
# build, tern gives each rank the GPU of its node-local rank (or GPU 0 when CUDA_VISIBLE_DEVICES
# shows it only one); LD_LIBRARY_PATH (libnccl, libcuda) and NCCL_* settings are passed to every rank.
set -euo pipefail
n=${1:?usage: launch/mpirun.sh N train RECIPE [options]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
tern=${TERN:-$here/target/release/tern}
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
export OMPI_MCA_plm_rsh_agent=${OMPI_MCA_plm_rsh_agent-}
pass=(-x LD_LIBRARY_PATH)
for v in $(compgen -e | grep -E '^(NCCL_|CUDA_|TERN_)' || true); do
  pass+=(-x "$v")
done
exec mpirun -np "$n" --map-by slot "${pass[@]}" "$tern" "$@"
