#!/usr/bin/env bash
# Run by slurm/train.sbatch as one srun task per node: start this node's training processes with accelerate.
#
# Needs CSI_MAIN_ADDR, CSI_MAIN_PORT, CSI_PYTHON (set by train.sbatch) and SLURM's per-task variables
# (SLURM_NODEID, SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE). Arguments go to the trainer unchanged.
set -euo pipefail
: "${CSI_MAIN_ADDR:?set by train.sbatch}" "${CSI_MAIN_PORT:?set by train.sbatch}" "${CSI_PYTHON:?set by train.sbatch}"

gpus_on_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then   # GPUs given without a SLURM GRES allocation
    tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .
  else
    echo 0
  fi
}

num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
node_rank=${SLURM_NODEID:-0}
gpus=$(gpus_on_node)
if [ "$gpus" -gt 0 ] && [ "${CSI_FORCE_CPU:-0}" != 1 ]; then
  procs_per_node=$gpus
else
  # Accelerate's --cpu launcher silently starts ONE process; multi-process CPU training needs the
  # multi-GPU launcher with ACCELERATE_USE_CPU=1 (gloo).
  export ACCELERATE_USE_CPU=1
  procs_per_node=${CSI_CPU_PROCS_PER_NODE:-1}
fi
world_size=$(( num_nodes * procs_per_node ))
launch=(--num_processes "$world_size" --num_machines "$num_nodes" --dynamo_backend no)
# a strategy file from launch/accelerate/ (FSDP2, DeepSpeed ZeRO); the flags above and below override its counts
[ -n "${CSI_ACCELERATE_CONFIG:-}" ] && launch=(--config_file "$CSI_ACCELERATE_CONFIG" "${launch[@]}")
if [ "$world_size" -gt 1 ]; then
  launch+=(--multi_gpu --machine_rank "$node_rank" --main_process_ip "$CSI_MAIN_ADDR"
           --main_process_port "$CSI_MAIN_PORT")
fi
read -r -a entry <<< "${CSI_TRAIN_ENTRY:--m csi_dist.train}"
echo "[launch_node $(hostname -s)/${SLURMD_NODENAME:-?}] node $node_rank/$num_nodes: $procs_per_node process(es)," \
  "gpus=$gpus, world $world_size, main $CSI_MAIN_ADDR:$CSI_MAIN_PORT"
export PYTHONPATH=${CSI_REPO:-.}${PYTHONPATH:+:$PYTHONPATH}
exec "$CSI_PYTHON" -m accelerate.commands.launch "${launch[@]}" "${entry[@]}" "$@"
