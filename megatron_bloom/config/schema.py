"""Typed run configuration.

Every field has a type, a default (or ``REQUIRED``) and a one-line docstring directly under it.
The docstrings are read back with ``ast`` (see ``docs.field_docs``) to build ``--help`` and the
README's configuration reference, so they are the single place a flag is documented.

Field names are Megatron-DeepSpeed's argument names: ``num_layers`` is ``--num-layers``.
Cross-field checks that need no process group live in ``validate.py``.

The ``model`` section's class belongs to the model family (``models/spec.py``); this module
names it ``ModelConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_bloom.models.spec import get_model_spec

ModelConfig = get_model_spec().config_cls
"""Architecture dataclass of the default model family (the ``model`` section)."""


@dataclass
class ParallelConfig:
    """How the ranks are laid out (tensor x pipeline x data) and how they talk."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree TP: ranks that split every weight matrix."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree PP: number of pipeline stages."""
    data_parallel_size: Optional[int] = None
    """Data-parallel degree DP; None derives it as world_size / (TP * PP)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 for the data-parallel optimizer (0 or 1 when PP > 1; with bf16, 0 and 1 both run BF16_Optimizer, as BLOOM-176B's zero_stage 0 did)."""
    pp_partition_method: str = "type:transformer|embedding"
    """How blocks are split into stages: 'uniform', 'parameters' or 'type:REGEX' (BLOOM counts embeddings as layers)."""
    distributed_backend: Optional[str] = None
    """'nccl' or 'gloo'; None picks nccl when CUDA is available, else gloo."""
    distributed_timeout_minutes: float = 10.0
    """Timeout of every collective; a lost rank makes the others fail after this long instead of hanging."""
    deepspeed: bool = True
    """Megatron-DeepSpeed's --deepspeed: DeepSpeed is always the engine here, so the switch is accepted and --no-deepspeed is refused."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON as Megatron-DeepSpeed's scripts write it (--deepspeed_config): its batch sizes, ZeRO stage, gradient clipping, bf16/fp16 and fp16 loss-scale settings fill the fields no flag or YAML sets; a value that disagrees with a flag is refused, naming both. The engine's own JSON is still built from the resolved configuration."""
    deepspeed_activation_checkpointing: bool = False
    """Megatron-DeepSpeed's switch to recompute through DeepSpeed's checkpointing; accepted: checkpoint_activations recomputes with this framework's TP-aware checkpointing (the same dropout masks on every TP rank) either way."""
    remote_device: str = "none"
    """Megatron-DeepSpeed's ZeRO-3 parameter offload at model build ('none', 'cpu', 'nvme'); only 'none' is supported."""
    sync_tp_duplicated_parameters: bool = False
    """Average the parameters every TP rank holds a copy of (LayerNorms, row-parallel biases) over the TP group in every forward, as Megatron-DeepSpeed's flag (BLOOM-176B's copies drifted apart in bf16)."""


@dataclass
class TrainingConfig:
    """Optimization, schedule, precision and stopping."""

    micro_batch_size: int = 1
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all DP ranks; None means micro_batch_size * DP (no accumulation)."""
    rampup_batch_size: Optional[List[int]] = None
    """Batch-size ramp-up: START INCREMENT SAMPLES (Megatron semantics)."""
    train_iters: Optional[int] = None
    """Optimizer steps to train for (give this or train_samples)."""
    train_samples: Optional[int] = None
    """Samples to train for (give this or train_iters)."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate floor after decay."""
    lr_decay_style: str = "cosine"
    """LR decay after warmup: 'constant', 'linear' or 'cosine'."""
    lr_warmup_iters: int = 0
    """Linear warmup length in iterations."""
    lr_warmup_samples: int = 0
    """Linear warmup length in samples (takes precedence over lr_warmup_iters when > 0)."""
    lr_decay_iters: Optional[int] = None
    """Decay length in iterations; None means train_iters."""
    lr_decay_samples: Optional[int] = None
    """Decay length in samples; None means train_samples."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to LayerNorms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    seed: int = 1234
    """Random seed for weights, dropout and data order."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights and fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at zero_stage 0 or 1)."""
    fp16: bool = False
    """Train in float16 with fp32 master weights and dynamic loss scaling."""
    loss_scale: Optional[float] = None
    """Static fp16 loss scale; None means dynamic."""
    initial_loss_scale: float = 2.0**32
    """Starting dynamic fp16 loss scale (DeepSpeed JSON: 2 ** fp16.initial_scale_power)."""
    loss_scale_window: int = 1000
    """Steps without overflow before the dynamic loss scale grows."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic fp16 loss scale shrinks (DeepSpeed's fp16.hysteresis)."""
    min_loss_scale: float = 1.0
    """Floor of the dynamic fp16 loss scale (DeepSpeed's fp16.min_loss_scale)."""
    optimizer: str = "adam"
    """Megatron-DeepSpeed's --optimizer: 'adam' (AdamW with decoupled weight decay, as Megatron's Adam) is the only one built here; 'sgd' is refused."""
    exit_interval: Optional[int] = None
    """Save and exit when the iteration is a multiple of this."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit after this many minutes of wall time."""
    skip_train_iteration_range: Optional[List[str]] = None
    """Iteration ranges 'START-END' whose batches are skipped (recorded by absolute sample index)."""
    kill_switch_path: Optional[str] = None
    """When this file exists the run saves and exits at the next step boundary (and does not start)."""
    nan_policy: str = "stop"
    """fp32/bf16: a NaN/Inf gradient on any rank either 'stop's the run before the update (naming iteration, rank and parameter) or 'skip's the update on every rank and counts it (fp16 always skips by loss scaling)."""


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: Optional[List[str]] = None
    """Megatron blend: 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...' of .bin/.idx datasets."""
    split: str = "969,30,1"
    """Train/validation/test split of data_path, as weights."""
    train_weighted_split_paths: Optional[List[str]] = None
    """Megatron-DeepSpeed form 'NAME: W START:END PATH, ...' for training data."""
    valid_weighted_split_paths: Optional[List[str]] = None
    """Same form for validation groups; each group is evaluated and reported on its own."""
    train_weighted_split_paths_path: Optional[str] = None
    """bigscience's mixture file for train_weighted_split_paths: one line of double-quoted groups "NAME: W START:END PATH, ..." (a group per line is read too)."""
    valid_weighted_split_paths_path: Optional[str] = None
    """The same for valid_weighted_split_paths: one quoted group per validation set (e.g. per language)."""
    test_weighted_split_paths: Optional[List[str]] = None
    """Megatron-DeepSpeed's test groups; refused: the trainer evaluates validation groups only (run launch/evaluate.py on a test set)."""
    tokenizer_name_or_path: Optional[str] = None
    """Tokenizer folder (or hub name when online) loadable with transformers.AutoTokenizer."""
    tokenizer_type: Optional[str] = None
    """Megatron-DeepSpeed's --tokenizer-type; 'PretrainedFromHF' (a transformers tokenizer, --tokenizer-name-or-path) is the only one read here."""
    data_impl: str = "infer"
    """Megatron-DeepSpeed's --data-impl: 'mmap' (MMIDIDX .bin/.idx) and 'infer' read the same files; the older 'lazy' and 'cached' formats are refused."""
    dataloader_type: Optional[str] = None
    """Megatron-DeepSpeed's --dataloader-type: 'single' (one pass in the order of the sample index, the only kind here); 'cyclic' is refused."""
    mmap_warmup: bool = False
    """Megatron-DeepSpeed's --mmap-warmup (read the index through once at start); accepted: the .idx is read at start and the .bin paged in on demand either way."""
    reset_position_ids: bool = False
    """Megatron-DeepSpeed's --reset-position-ids: position ids restart after each EOD. Changes nothing here: ALiBi has no position ids."""
    reset_attention_mask: bool = False
    """Megatron-DeepSpeed's --reset-attention-mask: no attention across EOD. Finetuning: changes nothing (packed samples already attend within their own pair only). Pretraining: refused (documents attend across EOD, as BLOOM trained)."""
    num_workers: int = 2
    """Background threads reading the next training steps' micro-batches while a step trains (0: each step reads its own when it starts), Megatron-DeepSpeed's DataLoader workers for training."""
    valid_num_workers: int = 2
    """The same for evaluation: threads reading each validation group's next batches while one is evaluated."""


@dataclass
class CheckpointConfig:
    """Saving and loading."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""
    load: Optional[str] = None
    """Directory to resume from; empty or missing starts from scratch with a warning."""
    save_interval: Optional[int] = None
    """Save every this many iterations."""
    keep_last_k: Optional[int] = None
    """Keep only the newest K complete checkpoints."""
    no_load_optim: bool = False
    """Load the weights of --load but not its optimizer state (fresh Adam moments), as Megatron-DeepSpeed; iteration and consumed samples are still read unless reset_progress or finetune. A checkpoint saved by a run that was itself given this flag resumes in full (a requeued job does not drop its own optimizer)."""
    no_load_rng: bool = False
    """Do not restore the RNG states of --load (fresh streams from --seed), as Megatron-DeepSpeed; same rule for a run's own checkpoints."""
    finetune: bool = False
    """Megatron-DeepSpeed's --finetune: load the weights of --load only (no optimizer, no RNG) and start at iteration 0 (consumed samples are kept, as its load_checkpoint keeps them); same rule for a run's own checkpoints."""
    reset_progress: bool = False
    """Megatron-DeepSpeed's --reset-progress (BLOOMZ): start at iteration 0 with 0 consumed samples from the checkpoint in --load; same rule for a run's own checkpoints."""
    universal_checkpoint: bool = False
    """Megatron-DeepSpeed's --universal-checkpoint (--load holds a universal checkpoint). Accepted: a checkpoint of another layout is converted to, or read as, a universal checkpoint here without the flag."""


@dataclass
class LoggingConfig:
    """What is reported and where."""

    log_interval: int = 10
    """Print and log metrics every this many iterations."""
    eval_interval: int = 1000
    """Evaluate on every validation group every this many iterations, and once at the end of
    training (also when the interval is past the run, as in Megatron-DeepSpeed)."""
    eval_iters: int = 10
    """Batches per evaluation; 0: no evaluation at all, and no validation data read (Megatron's way)."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard log directory; None disables TensorBoard."""
    tensorboard_queue_size: int = 1000
    """Events TensorBoard's writer holds before it writes them to disk (Megatron-DeepSpeed's --tensorboard-queue-size)."""
    log_timers_to_tensorboard: bool = False
    """Megatron-DeepSpeed's switch for its per-phase timers; accepted: iteration-time/* is always written and no per-phase timers are kept."""
    log_batch_size_to_tensorboard: bool = True
    """Write batch-size/batch-size (+ vs samples); on by default here (Megatron-DeepSpeed's default is off)."""
    log_validation_ppl_to_tensorboard: bool = True
    """Write .../lm loss validation ppl next to each validation loss; on by default here (Megatron-DeepSpeed's default is off)."""
    wandb_project: Optional[str] = None
    """Weights & Biases project; None disables wandb (WANDB_MODE=offline works without network)."""


@dataclass
class FinetuneConfig:
    """Instruction finetuning on packed prompt/answer pairs (launch/finetune.py only)."""

    pretrained: Optional[str] = None
    """Weights to start from: a native checkpoint (any layout) or a transformers BLOOM folder; ignored once --load holds the finetune's own checkpoint."""
    norm_target_loss: bool = False
    """Every target weighs the same in the loss instead of every target token (BLOOMZ's --norm-target-loss). With loss_normalization micro-batch (finetune_t0.py): a token weighs 1/L, L the length of its run of consecutive loss-bearing positions in the micro-batch's flattened mask, and the micro-batch's loss is divided by its number of runs (a run is one target, unless eod_mask_loss splits it or, with Megatron-DeepSpeed packing, a target ending a row touches one starting the next row of the micro-batch). With global-batch: a token of a target of n tokens weighs 1/n and the global batch's sum is divided by its number of targets."""
    loss_normalization: str = "micro-batch"
    """What a step's loss averages over. 'micro-batch' (Megatron-DeepSpeed's finetune_t0.py): each micro-batch's loss is its own mean over its loss-bearing tokens (or target runs with norm_target_loss) and DeepSpeed averages those over accumulation steps and DP ranks, so which rows share a micro-batch (micro_batch_size) changes the numbers. 'global-batch': the exact mean over the whole global batch (counts from the packing plan), the same for every micro-batch size, accumulation and DP size; refuses eod_mask_loss."""
    eod_mask_loss: bool = False
    """No loss at positions whose input token is the EOD id (Megatron-DeepSpeed's --eod-mask-loss as finetune_t0.py applies it, on top of the targets-only mask). Changes something only where an EOD token is followed by a target token: an input ending in EOD (its first target token is then not trained) or an EOD inside a target (which then counts as two runs with norm_target_loss); each target's final EOD is still predicted. The EOD id comes from the paired datasets; needs loss_normalization micro-batch."""
    loss_on_targets_only: bool = False
    """Accepted for Megatron-DeepSpeed command lines; changes nothing: the finetuning loss always covers target tokens only (finetune_t0.py masks inputs and padding whatever this flag says; Megatron-DeepSpeed reads it only for prefix-LM masks, which BLOOMZ did not use)."""
    reweight_loss_based_on_position_frequency: bool = False
    """Refused: Megatron-DeepSpeed uses it only for prefix-LM training (pretrain_prefix_lm.py reweights its loss mask by position; GPTModelPipe's prefix-mask loss, with loss_on_targets_only, divides by (s+2)/3 instead of (s+1)/2 expected target tokens per row of s); finetune_t0.py's packed causal mask (BLOOMZ's, the one here) never reads it."""
    prefixlm: bool = False
    """Megatron-DeepSpeed's --prefixlm (inputs attend bidirectionally); refused: BLOOMZ trained causal, the only mask built here."""
    overlong: str = "truncate"
    """Pairs longer than seq_length: 'truncate' their inputs from the left (the target is kept) or 'skip' them; both are counted and reported."""


@dataclass
class RunConfig:
    """A whole run: one section per concern, as in the YAML files under configs/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Rank layout."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimization and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Reporting."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Finetuning source and loss."""


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "finetune": FinetuneConfig,
}


FLAG_ALIASES = {
    "layer_norm_epsilon": ("--layernorm-epsilon",),
    "deepspeed_config": ("--deepspeed_config",),
}
"""Further spellings of a field's flag: Megatron-DeepSpeed's (and DeepSpeed's) names for it."""
