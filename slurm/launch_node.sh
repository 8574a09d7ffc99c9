#!/usr/bin/env bash
# Run by slurm/train.sbatch as one srun task per node: start this node's training processes with csi_dist.launcher
# (accelerate's options and config files, env:// rendezvous), which exits with the ranks' own status: 75 after a
# notice, so that train.sbatch never takes a preemption for a lost rank.
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
  export ACCELERATE_USE_CPU=1   # the ranks train on the CPU (gloo)
  procs_per_node=${CSI_CPU_PROCS_PER_NODE:-1}
fi
world_size=$(( num_nodes * procs_per_node ))
launch=(--num_processes "$world_size" --num_machines "$num_nodes" --dynamo_backend no
        --machine_rank "$node_rank" --main_process_ip "$CSI_MAIN_ADDR" --main_process_port "$CSI_MAIN_PORT")
if [ -n "${CSI_ACCELERATE_CONFIG:-}" ]; then
  # a strategy file from launch/accelerate/ (DDP, FSDP2, DeepSpeed ZeRO); the flags above override its counts. Its
  # distributed_type decides the strategy: a --multi_gpu here would make accelerate's parser drop FSDP or DeepSpeed
  # and train DDP without a word (tests/test_launch_node.py)
  launch=(--config_file "$CSI_ACCELERATE_CONFIG" "${launch[@]}")
elif [ "$world_size" -gt 1 ]; then
  launch+=(--multi_gpu)
fi
read -r -a entry <<< "${CSI_TRAIN_ENTRY:--m csi_dist.train}"
echo "[launch_node $(hostname -s)/${SLURMD_NODENAME:-?}] node $node_rank/$num_nodes: $procs_per_node process(es)," \
  "gpus=$gpus, world $world_size, main $CSI_MAIN_ADDR:$CSI_MAIN_PORT"
export PYTHONPATH=${CSI_REPO:-.}${PYTHONPATH:+:$PYTHONPATH}
exec "$CSI_PYTHON" -m csi_dist.launcher "${launch[@]}" "${entry[@]}" "$@"
