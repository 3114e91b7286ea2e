# shellcheck shell=bash
# The launch template every slurm/*.slurm recipe sources; not run on its own.
#
# A recipe sets its sizes with `: "${VAR:=default}"` (so the environment at sbatch time wins),
# fills the arrays that are specific to it (MODEL_ARGS, OPTIMIZER_ARGS, DATA_ARGS, and optionally
# EXTRA_ARGS), then calls `launch`. Everything else is built here, from the same variables. The
# pre-flight hands launch/plan.py the trainer's arguments themselves (TRAINER_ARGS) plus the cluster
# (--nodes, --gpus-per-node, --gpu, and --finetune for launch/finetune.py), so it plans the command
# that runs, not a copy of it:
#
#   ENTRY                 launch/pretrain.py or launch/finetune.py
#   MODEL_NAME            NAMED_MODELS key (--model-name); the array ARCH_ARGS (--num-layers/
#                         --hidden-size/--num-attention-heads/--ffn-hidden-size/--vocab-size)
#                         overrides its architecture
#   GPUS_PER_NODE         ranks per node (torchrun --nproc-per-node)
#   GPU_KIND              accelerator for the planner (a100-80g, h100-80g, h200, v100-32g, cpu)
#   TP PP ZERO_STAGE      layout; DP = nodes x GPUS_PER_NODE / (TP x PP)
#   MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE RAMPUP_BATCH_SIZE ("START INCR SAMPLES" or empty)
#   SEQ_LEN PRECISION (bf16|fp16|fp32) CHECKPOINT_ACTIVATIONS (1|0) DISTRIBUTED_BACKEND (nccl|gloo)
#   TRAIN_SAMPLES or TRAIN_ITERS
#   RUN_DIR               root of checkpoints/, tensorboard/, logs/ (must be on a shared filesystem)
#   SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS
#   EXIT_MARGIN_MINS      --exit-duration-in-mins = the job's time limit minus this (start-up + one
#                         save); EXIT_DURATION_MINS sets it directly
#   KILL_SWITCH_PATH      touch it to stop every run of this recipe at the next step boundary
#   DATA_PATH SPLIT       Megatron blend ("PREFIX" or "W1 PREFIX1 W2 PREFIX2 ...") and its split, or
#   TRAIN_SPLITS_FILE     a bigscience mixture file (--train-weighted-split-paths-path), with
#   VALID_SPLITS_FILE     optional validation groups; TOKENIZER
#   EXTRA_TRAINING_ARGS   a string of further trainer flags (word-split), e.g. for tests
#   PYTHON REPO           interpreter and repository checkout (default: python, $SLURM_SUBMIT_DIR)
#   DRY_RUN=1             print the commands instead of running srun/scontrol (for tests)
#
# Stop and restart (see slurm/README.md for the whole story):
#   - --exit-duration-in-mins saves and exits 0 before the time limit; the next task of the job
#     array (--array=1-N%1) resumes from the checkpoint (the same command loads it).
#   - SIGUSR1 (#SBATCH --signal=USR1@600, or scancel --signal=USR1) reaches slurm/torchrun_node.py
#     on every node, which passes it to the ranks; they save at the next step boundary and exit 3;
#     the node launcher turns that into a marker file, and `launch` requeues the job.
#   - When the log says the run is done, the job array's pending tasks are cancelled.

EXIT_REQUEUE=3  # megatron_bloom.training.signals.EXIT_REQUEUE

: "${PYTHON:=python}"
: "${REPO:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${DRY_RUN:=0}"
: "${RUN_DIR:=$REPO/runs/${SLURM_JOB_NAME:-bloom}}"
: "${DISTRIBUTED_BACKEND:=nccl}"
: "${PRECISION:=bf16}"
: "${CHECKPOINT_ACTIVATIONS:=1}"
: "${ZERO_STAGE:=1}"
: "${RAMPUP_BATCH_SIZE:=}"
: "${SAVE_INTERVAL:=100}"
: "${LOG_INTERVAL:=1}"
: "${EVAL_INTERVAL:=1000}"
: "${EVAL_ITERS:=1}"
: "${EXIT_MARGIN_MINS:=20}"
: "${KILL_SWITCH_PATH:=$RUN_DIR/kill-switch}"
: "${EXTRA_TRAINING_ARGS:=}"
: "${STOP_SIGNAL_RESEND_SECONDS:=30}"
: "${TORCHRUN_SHUTDOWN_TIMEOUT:=600}"

# NCCL on GPU clusters (the CPU test runs gloo and skips this). The exported ones are safe
# everywhere; the commented ones depend on the site's network and are left to the operator.
nccl_environment() {
    # A failed collective raises on every rank instead of hanging until the timeout.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Errors and warnings only; INFO prints the topology (useful once, noisy on 384 ranks).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # export NCCL_SOCKET_IFNAME=ib0          # bootstrap over the fast interface, not the admin one
    # export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand adapters NCCL may use
    # export NCCL_IB_TIMEOUT=22              # longer retry timeout on large, busy fabrics
    # export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA when GPU and NIC share a PCIe switch
    # export CUDA_DEVICE_MAX_CONNECTIONS=1   # keep TP communication ordered with compute
}

# Trainer data flags from DATA_PATH/SPLIT or TRAIN_SPLITS_FILE/VALID_SPLITS_FILE, plus TOKENIZER.
data_arguments() {
    DATA_ARGS=(--tokenizer-name-or-path "$TOKENIZER")
    if [[ -n ${TRAIN_SPLITS_FILE:-} ]]; then
        DATA_ARGS+=(--train-weighted-split-paths-path "$TRAIN_SPLITS_FILE")
        if [[ -n ${VALID_SPLITS_FILE:-} ]]; then DATA_ARGS+=(--valid-weighted-split-paths-path "$VALID_SPLITS_FILE"); fi
    else
        local blend
        read -r -a blend <<< "${DATA_PATH:?set DATA_PATH (a Megatron blend) or TRAIN_SPLITS_FILE}"
        DATA_ARGS+=(--data-path "${blend[@]}" --split "${SPLIT:-969,30,1}")
    fi
}

print_environment() {
    echo "=== $(date -Is) job ${SLURM_JOB_ID:-?} (array ${SLURM_ARRAY_JOB_ID:-none}_${SLURM_ARRAY_TASK_ID:-}, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)"
    echo "=== nodes: ${SLURM_JOB_NODELIST:-?} (${SLURM_NNODES:-?}); repo: $REPO"
    env | grep -E '^(SLURM_|CUDA|NCCL|TORCH|MASTER_|OMP_|PYTHON|DS_|HF_|TRANSFORMERS_)' | sort | sed 's/^/    /'
    "$PYTHON" -c 'import sys, torch; print("=== python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' || true
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | sed 's/^/    /'; fi
}

# Minutes of the job's time limit (D-HH:MM:SS, HH:MM:SS, MM:SS, MM), empty when unlimited/unknown.
job_time_limit_minutes() {
    local limit days=0 h=0 m=0 s=0
    limit=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %l 2>/dev/null | head -n 1) || return 0
    case $limit in ''|UNLIMITED|INVALID|NOT_SET) return 0 ;; esac
    if [[ $limit == *-* ]]; then days=${limit%%-*}; limit=${limit#*-}; fi
    IFS=: read -r -a parts <<< "$limit"
    case ${#parts[@]} in
        3) h=${parts[0]}; m=${parts[1]}; s=${parts[2]} ;;
        2) m=${parts[0]}; s=${parts[1]} ;;
        1) m=${parts[0]} ;;
    esac
    echo $(( 10#$days * 1440 + 10#$h * 60 + 10#$m + (10#$s > 0 ? 1 : 0) ))
}

# The first node's address: rendezvous host for torchrun's c10d store.
first_node_address() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # NodeAddr differs from the name on some clusters (and on an emulated test cluster).
    addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    echo "${addr:-$first}"
}

build_arguments() {
    : "${NNODES:=${SLURM_NNODES:?not inside a SLURM allocation (set NNODES to dry-run)}}"
    if [[ -z ${MASTER_ADDR:-} ]]; then MASTER_ADDR=$(first_node_address); fi
    # One port per job: two jobs sharing a node must not collide on the rendezvous port.
    : "${MASTER_PORT:=$(( 10000 + ${SLURM_JOB_ID:-0} % 50000 ))}"
    if [[ -z ${EXIT_DURATION_MINS:-} ]]; then
        local limit
        limit=$(job_time_limit_minutes)
        if [[ -n $limit ]]; then EXIT_DURATION_MINS=$(( limit > EXIT_MARGIN_MINS ? limit - EXIT_MARGIN_MINS : 1 )); fi
    fi

    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
    if [[ $DISTRIBUTED_BACKEND == nccl ]]; then nccl_environment; fi
    if [[ -z ${DATA_ARGS+set} ]]; then data_arguments; fi  # a recipe may build its own

    ARCH_ARGS=("${ARCH_ARGS[@]+"${ARCH_ARGS[@]}"}")
    PARALLEL_ARGS=(
        --tensor-model-parallel-size "$TP"
        --pipeline-model-parallel-size "$PP"
        --zero-stage "$ZERO_STAGE"
        --pp-partition-method 'type:transformer|embedding'
        --distributed-backend "$DISTRIBUTED_BACKEND"
    )
    BATCH_ARGS=(--micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" --seq-length "$SEQ_LEN")
    if [[ -n $RAMPUP_BATCH_SIZE ]]; then read -r -a ramp <<< "$RAMPUP_BATCH_SIZE"; BATCH_ARGS+=(--rampup-batch-size "${ramp[@]}"); fi
    if [[ -n ${TRAIN_ITERS:-} ]]; then BATCH_ARGS+=(--train-iters "$TRAIN_ITERS"); else BATCH_ARGS+=(--train-samples "$TRAIN_SAMPLES"); fi
    PRECISION_ARGS=()
    case $PRECISION in
        bf16) PRECISION_ARGS+=(--bf16) ;;
        fp16) PRECISION_ARGS+=(--fp16) ;;
        fp32) ;;
        *) echo "PRECISION=$PRECISION must be bf16, fp16 or fp32" >&2; exit 2 ;;
    esac
    if [[ $CHECKPOINT_ACTIVATIONS == 1 ]]; then PRECISION_ARGS+=(--checkpoint-activations); fi
    CHECKPOINT_ARGS=(--save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval "$SAVE_INTERVAL")
    EXIT_ARGS=(--kill-switch-path "$KILL_SWITCH_PATH")
    if [[ -n ${EXIT_DURATION_MINS:-} ]]; then EXIT_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS"); fi
    LOGGING_ARGS=(
        --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
        --tensorboard-dir "$RUN_DIR/tensorboard"
    )
    read -r -a extra_training <<< "$EXTRA_TRAINING_ARGS"

    TRAINER_ARGS=(
        --model-name "$MODEL_NAME" "${ARCH_ARGS[@]+"${ARCH_ARGS[@]}"}" "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${BATCH_ARGS[@]}" "${PRECISION_ARGS[@]}" "${OPTIMIZER_ARGS[@]}"
        "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${EXIT_ARGS[@]}" "${LOGGING_ARGS[@]}"
        "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}" "${extra_training[@]+"${extra_training[@]}"}"
    )
    TORCHRUN_ARGS=(
        --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-0}"
        --max-restarts 0 --tee 3
        # Time the ranks get to finish a save when the agent is told to stop (torchrun's own default is 30 s).
        --shutdown-timeout "$TORCHRUN_SHUTDOWN_TIMEOUT"
    )
    # The pre-flight plans the trainer's own arguments on this cluster (launch/plan.py --help).
    PLAN_ARGS=(--nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" --gpu "$GPU_KIND")
    if [[ $ENTRY == */finetune.py ]]; then PLAN_ARGS+=(--finetune); fi
}

# Fail in seconds, before the ranks start, when the command is invalid or cannot fit.
preflight() {
    printf '=== pre-flight: launch/plan.py'; printf ' %q' "${PLAN_ARGS[@]}" "${TRAINER_ARGS[@]}"; echo
    if ! "$PYTHON" "$REPO/launch/plan.py" "${PLAN_ARGS[@]}" "${TRAINER_ARGS[@]}"; then
        echo "=== pre-flight failed: fix the command above; nothing was started" >&2
        exit 2
    fi
}

run() {  # a command, or only its echo under DRY_RUN=1
    if [[ $DRY_RUN == 1 ]]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi
}

launch() {
    print_environment
    build_arguments
    echo "=== rendezvous ${MASTER_ADDR}:${MASTER_PORT}; exit duration ${EXIT_DURATION_MINS:-none} min; run dir $RUN_DIR"
    preflight
    mkdir -p "$RUN_DIR"/{checkpoints,tensorboard,logs,requeue}
    if [[ -e $KILL_SWITCH_PATH ]]; then
        echo "=== kill switch $KILL_SWITCH_PATH exists: not starting (remove it to train)"
        [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && run scancel --state=PENDING "$SLURM_ARRAY_JOB_ID"
        exit 0
    fi
    local marker="$RUN_DIR/requeue/job${SLURM_JOB_ID:-0}.restart${SLURM_RESTART_COUNT:-0}.node{node}"
    local log="$RUN_DIR/logs/main_log.txt" offset rc
    offset=$(stat -c %s "$log" 2>/dev/null || echo 0)

    echo "=== $(date -Is) starting ${NNODES} x ${GPUS_PER_NODE} ranks: $ENTRY"
    # One task per node; each runs torchrun (through torchrun_node.py) with c10d rendezvous on the
    # first node. --kill-on-bad-exit: a node that fails takes the step down instead of leaving the
    # others blocked in a collective; --wait=60: once one node is done the rest get 60 s.
    set +e
    run srun --kill-on-bad-exit=1 --wait=60 --nodes="$NNODES" --ntasks-per-node=1 \
        "$PYTHON" -u "$REPO/slurm/torchrun_node.py" \
            --requeue-marker "$marker" --resend-seconds "$STOP_SIGNAL_RESEND_SECONDS" -- \
            "${TORCHRUN_ARGS[@]}" "$REPO/$ENTRY" "${TRAINER_ARGS[@]}" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "=== $(date -Is) srun exit code $rc"

    # A rank exits 3 only after the save's last barrier, i.e. once the checkpoint is committed, so
    # one node's marker is enough (c10d rendezvous may put global rank 0 on any node).
    if compgen -G "${marker//\{node\}/*}" >/dev/null; then
        echo "=== stopped for requeue (exit code $EXIT_REQUEUE): scontrol requeue ${SLURM_JOB_ID:-?}"
        run scontrol requeue "${SLURM_JOB_ID:-0}"
        exit 0
    fi
    if [[ $rc -eq 0 ]] && tail -c +$((offset + 1)) "$log" 2>/dev/null | grep -q '> training done at iteration'; then
        echo "=== training done"
        if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
            echo "=== cancelling the pending tasks of array job $SLURM_ARRAY_JOB_ID"
            run scancel --state=PENDING "$SLURM_ARRAY_JOB_ID"
        fi
    fi
    exit "$rc"
}
