import dataclasses

import pytest
import yaml

from megatron_bloom.config import RunConfig, parse_config, save_resolved_config, validate_config
from megatron_bloom.errors import UserError
from megatron_bloom.config.docs import field_docs, markdown_reference
from megatron_bloom.config.loader import build_parser, config_from_dict
from megatron_bloom.config.schema import SECTIONS

MEGATRON_FLAGS = """--num-layers --hidden-size --num-attention-heads --seq-length --tensor-model-parallel-size
--pipeline-model-parallel-size --micro-batch-size --global-batch-size --train-iters --train-samples --lr --min-lr
--lr-decay-style --lr-warmup-iters --lr-warmup-samples --lr-decay-samples --clip-grad --weight-decay --adam-beta1
--adam-beta2 --adam-eps --seed --bf16 --fp16 --zero-stage --checkpoint-activations --data-path --split
--tokenizer-name-or-path --save --load --save-interval --eval-interval --eval-iters --log-interval
--tensorboard-dir --exit-interval --exit-duration-in-mins""".split()


def test_every_megatron_flag_exists():
    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    missing = [f for f in MEGATRON_FLAGS if f not in flags]
    assert not missing


def test_every_field_has_a_docstring():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, (section, undocumented)
    assert "`num_layers` / `--num-layers`" in markdown_reference()


def write_yaml(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, {"model": {"num_layers": 6, "hidden_size": 128}, "training": {"lr": 1e-3}})
    cfg = parse_config(["--config", path, "--num-layers", "8", "--bf16", "--data-path", "0.3", "a", "0.7", "b"])
    assert cfg.model.num_layers == 8  # flag wins
    assert cfg.model.hidden_size == 128  # yaml kept
    assert cfg.training.lr == 1e-3
    assert cfg.training.bf16 and not cfg.training.fp16
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]


def test_default_dtype_is_fp32():
    cfg = parse_config([])
    assert not cfg.training.bf16 and not cfg.training.fp16


def test_named_model_fills_unset_fields(tmp_path):
    cfg = parse_config(["--model-name", "bloom-176b", "--seq-length", "512"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (70, 14336, 112)
    assert cfg.model.seq_length == 512
    with pytest.raises(UserError, match="did you mean 'bloom-560m'"):
        parse_config(["--model-name", "bloom-560"])


@pytest.mark.parametrize(
    "data, match",
    [
        ({"modle": {"num_layers": 2}}, "unknown section 'modle'; did you mean 'model'"),
        ({"model": {"num_layer": 2}}, "unknown key 'model.num_layer'; did you mean 'num_layers'"),
        ({"model": {"num_layers": "two"}}, "model.num_layers must be of type int"),
        ({"training": {"bf16": "yes"}}, "training.bf16 must be true or false"),
        ({"model": {"num_layers": True}}, "model.num_layers must be of type int"),
    ],
)
def test_yaml_is_strict(tmp_path, data, match):
    with pytest.raises(UserError, match=match):
        parse_config(["--config", write_yaml(tmp_path, data)])


def test_yaml_float_written_as_exponent(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("training:\n  lr: 6e-5\n")  # YAML 1.1 reads this as a string
    assert parse_config(["--config", str(path)]).training.lr == 6e-5


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_config(["--config", str(bad)])


def test_unknown_flag_names_closest():
    with pytest.raises(UserError, match="unknown argument '--num-layer'; did you mean '--num-layers'"):
        parse_config(["--num-layer", "3"])
    # The deepspeed launcher appends --local_rank; it is accepted and ignored.
    assert parse_config(["--local_rank=3"]).model.num_layers == RunConfig().model.num_layers


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(["--num-layers", "3", "--data-path", "x", "--train-iters", "5"])
    validate_config(cfg, 2)
    path = save_resolved_config(cfg, str(tmp_path / "run"))
    again = config_from_dict(yaml.safe_load(open(path)))
    assert again == cfg
    assert again.parallel.data_parallel_size == 2


def cfg_of(*argv):
    return parse_config(list(argv) + ["--train-iters", "10"])


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3"], 3,
         "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3; use 1, 2 or 4"),
        (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
         "world size 6 is not divisible by tensor_model_parallel_size x pipeline_model_parallel_size = 2 x 2 = 4"),
        (["--num-layers", "2", "--pipeline-model-parallel-size", "5", "--bf16", "--zero-stage", "1"], 5,
         "pipeline_model_parallel_size=5 leaves stage 4 without weights: pp_partition_method "
         "'type:transformer|embedding' fills at most 4 stages with num_layers=2; use at most 4 stages"),
        (["--num-layers", "2", "--pipeline-model-parallel-size", "5", "--pp-partition-method", "type:transformer"], 5,
         "'type:transformer' fills at most 4 stages with num_layers=2"),
        (["--micro-batch-size", "2", "--global-batch-size", "6"], 2,
         "global_batch_size=6 is not divisible by micro_batch_size x data_parallel_size = 2 x 2 = 4; use 4 or 8"),
        (["--bf16", "--fp16"], 1, "bf16 and fp16 are both set"),
        (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], 2, "zero_stage=2 cannot be combined"),
        (["--hidden-size", "66", "--num-attention-heads", "4"], 1, "hidden_size=66 is not divisible by num_attention_heads=4"),
        (["--lr-decay-style", "cosin"], 1, "lr_decay_style='cosin' is not one of"),
        (["--rampup-batch-size", "3", "2", "100", "--global-batch-size", "8", "--micro-batch-size", "2",
          "--train-samples", "100"], 1, None),
    ],
)
def test_validation_messages(argv, world, message):
    if message is None:  # rampup start 3 with micro batch 2 -> not divisible; train_iters also given
        with pytest.raises(UserError, match="rampup_batch_size start=3"):
            validate_config(parse_config(argv), world)
        return
    with pytest.raises(UserError) as exc:
        validate_config(cfg_of(*argv), world)
    assert message in str(exc.value)


def test_validation_derives_dp_and_global_batch():
    cfg = validate_config(cfg_of("--tensor-model-parallel-size", "2", "--micro-batch-size", "3"), 8)
    assert cfg.parallel.data_parallel_size == 4
    assert cfg.training.global_batch_size == 12


def test_needs_exactly_one_of_iters_or_samples():
    with pytest.raises(UserError, match="exactly one of train_iters"):
        validate_config(parse_config([]), 1)
    with pytest.raises(UserError, match="exactly one of train_iters"):
        validate_config(parse_config(["--train-iters", "1", "--train-samples", "4"]), 1)
    validate_config(parse_config([]), 1, for_training=False)


def test_eval_iters_0_is_accepted_and_a_negative_count_refused():
    validate_config(cfg_of("--eval-iters", "0"), 1)  # Megatron's "no evaluation"
    with pytest.raises(UserError, match="eval_iters=-1 is negative; .* or --eval-iters 0 for no evaluation"):
        validate_config(cfg_of("--eval-iters", "-1"), 1)


def test_padded_vocab_matches_bloom():
    cfg = RunConfig().model
    cfg.vocab_size = 250680
    assert cfg.padded_vocab_size(1) == 250752
    assert cfg.padded_vocab_size(4) == 250880  # BLOOM's released checkpoints: 250,880 rows
    cfg.vocab_size = 250880
    assert cfg.padded_vocab_size(4) == 250880  # rows a checkpoint has stay as they are
    assert cfg.padded_vocab_size(3) == 251136 and 251136 % (128 * 3) == 0


def test_configuration_reference_is_current(repo_root):
    import contextlib
    import io
    import os

    from megatron_bloom.config.docs import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main()
    with open(os.path.join(repo_root, "docs", "configuration.md")) as fh:
        assert fh.read() == buf.getvalue(), "regenerate: python -m megatron_bloom.config.docs > docs/configuration.md"
