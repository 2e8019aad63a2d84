#!/usr/bin/env bash
# Submit an mgfa-ray job file to a running Ray cluster with the Ray Jobs API.
#
# Usage: RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh JOB.yaml [mgfa-ray run options...]
#   e.g. RAY_ADDRESS=http://head:8265 MGFA_DATA_ROOT=/shared/data \
#          jobs/submit.sh jobs/leafsnap20.yaml --output-dir /shared/outputs/leafsnap20
#        jobs/submit.sh jobs/cotton80_paper.yaml --smoke
#
# JOB.yaml is relative to the repository root, which is uploaded as the job's working directory
# (without .venv, outputs, .git, results, caches, *.pt/*.pth). The cluster's nodes need mgfa-ray
# installed (same version) and, for more than one node, the data root and --output-dir on a
# filesystem every node sees, or masks.location / search.storage_path on an object store.
# Paths outside the repository do not exist in the uploaded copy (../shared/data, the default data
# root; ../shared/weights/...): set MGFA_DATA_ROOT, and make such paths of the job file absolute.
# MGFA_DATA_ROOT and the object store's AWS_* settings (endpoint, region, profile name) are passed
# to the job when set here, never its keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN): Ray writes a job's runtime_env into its logs, so every node reads its own
# credentials (a profile or credentials file on the node, or the machine's role; README, "Storage
# configuration"). Output is streamed until the job ends; Ctrl-C stops the streaming, not the job
# (`ray job stop ID`). Arguments must not contain spaces.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://HEAD:8265}"
cd "$(dirname "$0")/.."
job=$1
shift
[[ -f $job ]] || { echo "error: job file $job not found (relative to $PWD)" >&2; exit 2; }

runtime_env=$(python3 -c '
import json, os
secret = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}
env = {k: v for k, v in os.environ.items()
       if v and (k == "MGFA_DATA_ROOT" or (k.startswith("AWS_") and k not in secret))}
excludes = [".venv", "outputs", ".git", "results", "runs", "__pycache__", ".pytest_cache", ".ruff_cache",
            "*.egg-info", "*.pt", "*.pth"]
print(json.dumps({"excludes": excludes, "env_vars": env}))')

exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
  -- mgfa-ray run "$job" "$@"
