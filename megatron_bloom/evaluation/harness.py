"""The lm-evaluation-harness model ``megatron_bloom``: any of our checkpoints under lm-eval's tasks.

    python launch/lm_eval_harness.py --model megatron_bloom --model_args load=CKPT[,tokenizer=DIR][,batch_size=N] \
        --tasks xcopa,flores --batch_size 8 --log_samples --output_path results/

``model_args``: ``load`` (native checkpoint at any TP/PP, or a transformers folder; required),
``tokenizer`` (folder; default the checkpoint's own), ``batch_size`` (wins over ``--batch_size``), ``max_length`` (tokens per
forward pass; default the tokenizer's model_max_length, else the checkpoint's seq_length),
``max_gen_toks`` (256), ``dtype`` (fp32/fp16/bf16), ``attention_impl`` (sdpa/eager), ``device``,
``add_bos_token``, ``prefix_token_id``.

``device`` (``model_args`` or lm-eval's ``--device``) is where the model is loaded and where every
batch, KV cache and sampling generator is made. lm-eval's CLI passes ``cuda:0`` unless told
otherwise, so a device this machine cannot use falls back, with a warning, to its accelerator, else
the CPU (as lm-eval's ``hf`` model does); a name that is no torch device at all is an error.

It follows the conventions of lm-eval's ``hf`` model so per-sample numbers agree with it on the
same weights: loglikelihood via ``TemplateLM`` (trailing context spaces move to the continuation,
an empty context is the prefix token, BOS else EOS), right-padded batches sorted longest first
(``scoring.score_requests``), rolling windows of ``max_length`` tokens conditioned on the prefix
token (``scoring.sliding_windows`` with stride = max_length, the same windows as lm-eval's), and
generation from left-padded batches grouped by generation kwargs, contexts cut to
``max_length - max_gen_toks`` tokens, EOS added to the stop strings, output cut at the first one.

lm-eval 0.4.x does not find models registered outside its package from its plain ``lm_eval``
command; ``launch/lm_eval_harness.py`` (or ``cli_main`` here) imports this module first and then runs
lm-eval's own CLI with the arguments unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import lm_eval.models  # noqa: F401 - registers the built-in names (hf, ...) before ours is added
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from megatron_bloom.errors import UserError
from megatron_bloom.evaluation.loading import load_for_eval
from megatron_bloom.generation import DeviceUnavailable, decode, resolve_device
from megatron_bloom.evaluation.scoring import score_requests, sliding_windows

eval_logger = logging.getLogger(__name__)
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "seed"}


def _int_arg(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"model_args {name}={value!r} must be an integer") from None


def _device_or_fallback(device: Optional[str]) -> torch.device:
    """``device`` (default cpu) if this machine can run on it, else its accelerator, else the CPU;
    see the module docstring."""
    try:
        return resolve_device(device)
    except DeviceUnavailable as exc:
        fallback = torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
        eval_logger.warning(f"{exc}; running on {fallback} instead")
        return fallback


@register_model("megatron_bloom")
class MegatronBloomLM(TemplateLM):
    """lm-eval ``LM`` over our single-process BLOOM (native checkpoints are merged on load)."""

    def __init__(
        self,
        load: Optional[str] = None,
        tokenizer: Optional[str] = None,
        batch_size: Any = 1,
        max_batch_size: Any = None,
        device: Optional[str] = None,
        max_length: Any = None,
        max_gen_toks: Any = 256,
        dtype: Optional[str] = None,
        attention_impl: Optional[str] = None,
        add_bos_token: Optional[bool] = None,
        prefix_token_id: Any = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"unknown model_args for megatron_bloom: {', '.join(sorted(unknown))} (known: load, "
                            f"tokenizer, batch_size, max_length, max_gen_toks, dtype, attention_impl, device, "
                            f"add_bos_token, prefix_token_id)")
        if not load:
            raise UserError("megatron_bloom needs model_args load=DIR (a native checkpoint or transformers folder)")
        if str(batch_size).startswith("auto"):
            raise UserError("megatron_bloom takes an integer batch size, not 'auto'")
        self.batch_size = _int_arg("batch_size", batch_size)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        self.em = load_for_eval(str(load), tokenizer, dtype, attention_impl, _device_or_fallback(device))
        self.tokenizer = self.em.tokenizer
        self._device = self.em.device
        self.max_length = (_int_arg("max_length", max_length) if max_length is not None
                            else self.em.default_max_length())
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self.add_bos_token = add_bos_token
        self._prefix = (_int_arg("prefix_token_id", prefix_token_id) if prefix_token_id is not None
                        else self.em.prefix_id("bos"))
        self._load = str(load)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MegatronBloomLM":
        """``model_args`` win over the CLI's ``--batch_size``/``--device``, which lm-eval always passes
        (``--batch_size`` defaults to 1), so ``model_args ...,batch_size=8`` works."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "MegatronBloomLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- what lm-eval reads ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.em.eos_id if self.em.eos_id is not None else self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "megatron_bloom").replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_load": self._load, "model_num_parameters": sum(p.numel() for p in self.em.model.parameters()),
                "model_dtype": str(next(self.em.model.parameters()).dtype)}

    # ---- tokens ------------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> List[int]:
        """The tokenizer's ``encode``, with special tokens as the ``hf`` model adds them."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if flag is None:
            flag = True  # transformers' default: the tokenizer's post-processor decides
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            flag = False  # the text already starts with BOS
        ids = self.tokenizer.encode(string, add_special_tokens=flag)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: List[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- requests ----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None
                              ) -> List[Tuple[float, bool]]:
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        scores = score_requests(self.em.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                                override_bs or self.batch_size, progress=pbar.update)
        pbar.close()
        for (key, _, _), answer in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            doc = sliding_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, self.max_length)
            windows.extend((None, ctx, cont) for ctx, cont in doc)
            owner.extend([i] * len(doc))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob  # a Python float sum over windows, in window order
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        results: List[str] = []
        batches = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                           group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        for chunk in batches.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            unsupported = sorted(set(kwargs) - _SAMPLING_KEYS)
            if unsupported:
                raise UserError(f"megatron_bloom generation does not support {', '.join(unsupported)}")
            max_ctx = self.max_length - max_gen_toks
            if max_ctx < 1:
                raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                                f"max_length={self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx) or [self.prefix_token_id] for c in contexts]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            seed = int(kwargs["seed"]) if "seed" in kwargs else None  # a generator on the model's device

            def stopped(_row: int, new: List[int]) -> bool:
                text = self.tok_decode(new, skip_special_tokens=False)
                return any(s and s in text for s in until)

            new_tokens = decode(self.em.model, prompts, max_gen_toks, self.em.eos_id, self.em.pad_id,
                                temperature, float(kwargs.get("top_p", 1.0)), seed, is_done=stopped)
            for context, gen_kwargs, new in zip(contexts, all_kwargs, new_tokens):
                text = postprocess_generated_text(self.tok_decode(new), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return batches.get_original(results)


def cli_main() -> None:
    """``lm_eval``'s command line with ``megatron_bloom`` registered (a console-script target).

    Our own errors (a checkpoint that does not load, bad model_args) print one ``error:`` line and
    exit 2; lm-eval's own messages are left as lm-eval prints them.
    """
    from lm_eval.__main__ import cli_evaluate

    from megatron_bloom.checkpoint.trust import weights_only_loading
    from megatron_bloom.errors import fail

    try:
        with weights_only_loading():  # as every entry point: no file is unpickled in full
            cli_evaluate()
    except UserError as exc:
        fail(str(exc))
