#!/usr/bin/env bash
# Llama 3 8B pretraining on a Cloud TPU v5p-32 pod slice (16 chips on 4 hosts): ONE PROCESS
# PER HOST, each driving its host's 4 chips, started on every host at once by
# `gcloud compute tpus tpu-vm ssh --worker=all`. Run it from any machine with gcloud:
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a MODEL_DIR=gs://my-bucket/runs/llama3_8b_v5p32 \
#     bash scripts/cluster/tpu_pod.sh [trainer flags, e.g. --gin.TRAIN_STEPS=100]
# Every host needs the repository checked out at $REPO_DIR (default ~/t5x_like) with
# .venv set up; SETUP=1 does that first on all hosts (scripts/setup.sh and the [tpu]
# extra: libtpu, pinned in pyproject.toml). MODEL_DIR must be one run directory that every
# host reaches (a gs:// bucket: a host's own disk would give each host its own run).
#
# --multiprocess: jax.distributed.initialize() with no addresses; jax finds the hosts, the
# process ids and the coordinator (worker 0) from the TPU VM's metadata (cluster.py, jax's
# clusters/cloud_tpu_cluster.py). The mesh: the one-node experiment's FSDP over all 16 chips
# of the slice (one ICI domain), without the H100 preset's GPU settings (XLA flags, memory
# fraction, NCCL variables); 4 microbatches of 16 rows, one row per chip at a time.
# A host that dies stops the others within --heartbeat_timeout (100 s); the same command
# resumes from the newest checkpoint (docs/OPERATIONS.md).
# Written from the Cloud TPU documentation ("Run JAX code on TPU Pod slices") and JAX's
# multi-process guide: no TPU was available where this was written, so it has not been run.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM's name}"
: "${ZONE:?set ZONE to the TPU VM's zone}"
: "${MODEL_DIR:?set MODEL_DIR=gs://BUCKET/runs/NAME, one run directory every host reaches}"
REPO_DIR=${REPO_DIR:-t5x_like}
printf -v EXTRA ' %q' "$@"
printf -v MODEL_DIR_FLAG '%q' "--gin.MODEL_DIR='${MODEL_DIR}'"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

if [ "${SETUP:-0}" = 1 ]; then
  on_all_hosts "cd $REPO_DIR && bash scripts/setup.sh && .venv/bin/pip install -e '.[tpu]'"
fi

on_all_hosts "cd $REPO_DIR && .venv/bin/python -m t5x_like.train --multiprocess \
  --gin_file=experiments/llama3_8b_h100_node.gin \
  --gin.partitioning.MeshConfig.devices_per_node=16 \
  --gin.partitioning.MeshConfig.xla_flags='[]' \
  --gin.partitioning.MeshConfig.memory_fraction=None \
  --gin.partitioning.MeshConfig.env='{}' \
  --gin.NUM_MICROBATCHES=4 \
  $MODEL_DIR_FLAG$EXTRA"
