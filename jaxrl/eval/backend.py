"""The lm-eval model backend "jaxrl": lm-evaluation-harness requests answered by jaxrl's sharded forward and
KV-cache sampler.

`lm_eval --model jaxrl --model_args pretrained=DIR,...` (after `import jaxrl.eval.backend`) or `jaxrl eval`.
DIR is a finished jaxrl run directory or an HF *ForCausalLM checkpoint directory. Model args: `tokenizer` (a
directory with tokenizer.json, when the model's own is elsewhere), `dtype` (compute dtype, e.g. float32),
`mesh_preset`/`mesh_data`/`mesh_fsdp`/`mesh_tensor` (jaxrl.sharding), `batch_size` (rows per process and
call), `max_length`, `max_gen_toks` (default for tasks that set none), `bucket` (batch widths are multiples of
it: one compile per width), `seed` (sampled generation), `add_bos_token`, `prefix_token_id`, `logprob_chunk`
(log-likelihoods over sequence chunks of this many positions, no [B, T, V] logits; default: the model's own
`model.logprob_chunk`, 0 for an HF checkpoint).

Semantics follow lm-eval's `hf` backend request for request: the same tokenisation (BOS from the tokenizer's
post-processor unless the text already starts with it), the same left truncation to `max_length`, the same
rolling windows, stop sequences cut as it cuts them, chat templates rendered as its `apply_chat_template`
(the final message continued when lm-eval asks for no generation prompt; system turns dropped when the
template rejects them), generations decoded as transformers decodes them. Log-probs are fp32 log-softmax of
fp32 logits. tests/test_lm_eval.py checks all of it against lm-eval's own `hf` backend.

Multi-host: `rank`/`world_size` are the JAX process index and count, so lm-eval hands each process its share
of the documents; every process then runs the same sequence of jitted calls (batch counts and widths agreed
across processes), feeding its own rows of each global batch, and process 0 gets the gathered metrics.
Stop sequences are applied after generation: the sampler stops early only when every row of a batch has
emitted EOS or max_gen_toks tokens.
"""

from __future__ import annotations

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxrl import distributed, sampling, sharding
from jaxrl.config import ConfigError, MeshConfig
from jaxrl.data.pipeline import bucket_width
from jaxrl.eval import model as model_lib
from jaxrl.models import logprobs

DEFAULT_BATCH_SIZE = 16


def continuation_scores(model, inputs_BT, targets_BT, mask_BT, chunk: int | None = None):
    """Summed log p(target | inputs up to it) over masked positions [B] and whether every masked target is the
    argmax [B] (lm-eval's is_greedy); fp32 log-softmax of fp32 logits, over sequence chunks of `chunk`
    positions (default: the model's logprob_chunk; 0: all at once), so chunked no [B, T, V] array is made."""
    chunk = model.cfg.logprob_chunk if chunk is None else chunk
    logp_BT, greedy_BT = logprobs.greedy_token_logps(
        model.hidden(inputs_BT), model.lm_kernel(), targets_BT, chunk=chunk
    )
    mask_BT = mask_BT > 0
    return jnp.sum(jnp.where(mask_BT, logp_BT, 0.0), axis=-1), jnp.all(greedy_BT | ~mask_BT, axis=-1)


def allgather_objects(obj) -> list:
    """Every process's `obj` (picklable), in process order; [obj] for one process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(everything[p, : int(sizes[p])].tobytes()) for p in range(len(sizes))]


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    return int(value)


@register_model("jaxrl")
class JaxrlLM(TemplateLM):
    """lm-eval's LM over a jaxrl run dir or HF checkpoint dir (see the module docstring for the arguments)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        mesh_preset: str = "fsdp",
        mesh_data: int = -1,
        mesh_fsdp: int = 1,
        mesh_tensor: int = 1,
        batch_size=DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        bucket: int = 64,
        seed: int = 0,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        logprob_chunk: int | None = None,
        **unused,
    ):
        super().__init__()
        source = pretrained or model
        if not source:
            raise ConfigError(
                "the jaxrl backend needs pretrained=DIR (a jaxrl run dir or an HF checkpoint dir)"
            )
        distributed.initialize()
        self.mesh_preset = mesh_preset
        self.mesh = sharding.make_mesh(
            MeshConfig(data=int(mesh_data), fsdp=int(mesh_fsdp), tensor=int(mesh_tensor), preset=mesh_preset)
        )
        self.loaded = model_lib.load(
            source, self.mesh, mesh_preset, dtype=dtype, tokenizer=tokenizer, max_length=max_length
        )
        self.tok = self.loaded.tokenizer
        self._max_length = self.loaded.max_length
        self._max_gen_toks = int(max_gen_toks)
        self.bucket = int(bucket)
        self.seed = int(seed)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        chunk = None if logprob_chunk is None else int(logprob_chunk)
        self._rank, self._world_size = jax.process_index(), jax.process_count()
        self._batch_sharding = sharding.batch_sharding(self.mesh, mesh_preset)
        self._rows = self._rows_per_process(_batch_size(batch_size))
        self._local_rows = self._process_rows(self._rows * self._world_size)
        self._generate_calls = 0
        graphdef = self.loaded.graphdef
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def score(params, inputs_BT, targets_BT, mask_BT):
            with sharding.use_mesh(self.mesh, mesh_preset):
                return continuation_scores(nnx.merge(graphdef, params), inputs_BT, targets_BT, mask_BT, chunk)

        self._score = jax.jit(score, out_shardings=(replicated, replicated))

    def _rows_per_process(self, batch_size: int) -> int:
        """Rows each process feeds per call: batch_size rounded up so the global batch divides the mesh."""
        divisor = sharding.batch_divisor(self.mesh, self.mesh_preset)
        if divisor % self._world_size:
            raise ConfigError(
                f"the batch is split {divisor} ways over mesh {dict(self.mesh.shape)}, which does not "
                f"divide over {self._world_size} processes; use a mesh whose batch axes span them"
            )
        per_process = divisor // self._world_size
        return -(-max(1, batch_size) // per_process) * per_process

    def _process_rows(self, global_rows: int) -> np.ndarray:
        """The rows of a global batch that this process's devices hold (it feeds and reads those)."""
        index = self._batch_sharding.addressable_devices_indices_map((global_rows,))
        rows = sorted({r for sl in index.values() for r in range(*sl[0].indices(global_rows))})
        return np.asarray(rows)

    def _global(self, local_BT: np.ndarray) -> jax.Array:
        if self._world_size == 1:
            return jax.device_put(local_BT, self._batch_sharding)
        shape = (local_BT.shape[0] * self._world_size,) + local_BT.shape[1:]
        return jax.make_array_from_process_local_data(self._batch_sharding, local_BT, shape)

    def _fetch(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a global batch output."""
        if self._world_size > 1 and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))[self._local_rows]

    def _agree(self, widths: list[int]) -> list[int]:
        """Per-call widths every process uses: the longest list, element-wise maxima."""
        if self._world_size == 1:
            return widths
        everyone = allgather_objects(widths)
        n = max(len(w) for w in everyone)
        return [max(w[k] if k < len(w) else 0 for w in everyone) for k in range(n)]

    # lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._rows

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tok.render(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs,
    ) -> list[int]:
        add = add_special_tokens
        if add is None:
            add = self.add_bos_token if self.add_bos_token is not None else True
            if self.tok.bos_text and string.startswith(self.tok.bos_text):
                add = False  # the text (a rendered chat template) already starts with BOS
        ids = self.tok.encode(string, bool(add))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens)

    def all_gather(self, tensor):
        if self._world_size == 1:
            return tensor
        import torch

        return torch.as_tensor(np.stack(allgather_objects(np.asarray(tensor.cpu()))))

    def gather_object(self, obj, dst=0):
        everyone = allgather_objects(obj)
        return everyone if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxrl.eval.backend")

    # Scoring

    def score_tokens(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (context ids, continuation ids), left-truncated to
        max_length + 1 tokens as lm-eval's hf backend does; batched by length, sharded over the mesh."""
        L = self._max_length
        seqs, n_cont = [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("an empty continuation cannot be scored")
            if len(continuation) > L:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {L}")
            seqs.append(np.asarray((list(context) + list(continuation))[-(L + 1) :], np.int32))
            n_cont.append(len(continuation))
        lengths = np.asarray([len(s) - 1 for s in seqs], np.int64)  # model inputs drop the last token
        order = np.argsort(-lengths, kind="stable")
        B = self._rows
        batches = [order[i : i + B] for i in range(0, len(order), B)]
        widths = self._agree([bucket_width(lengths, b, self.bucket, L) for b in batches])
        pad = self.tok.pad_id
        pending = []
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self._rank != 0, desc="jaxrl loglikelihood")
        for k, width in enumerate(widths):
            chunk = batches[k] if k < len(batches) else np.zeros((0,), np.int64)
            inputs = np.full((B, width), pad, np.int32)
            targets = np.full((B, width), pad, np.int32)
            mask = np.zeros((B, width), np.int32)
            for row, i in enumerate(chunk):
                s, n = seqs[i], len(seqs[i]) - 1
                inputs[row, :n], targets[row, :n] = s[:-1], s[1:]
                mask[row, n - n_cont[i] : n] = 1
            out = self._score(
                self.loaded.params, self._global(inputs), self._global(targets), self._global(mask)
            )
            pending.append((chunk, out))  # fetched after every call is dispatched: the device never waits
            bar.update(len(chunk))
        bar.close()
        results: list = [None] * len(pairs)
        for chunk, (logp, greedy) in pending:
            logp, greedy = self._fetch(logp), self._fetch(greedy)
            for row, i in enumerate(chunk):
                results[i] = (float(logp[row]), bool(greedy[row]))
        return results

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm)
        for (request, _, _), answer in zip(requests, results, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((context, continuation))
                owners.append(index)
        scores = self.score_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, scores, strict=True):
            totals[owner] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # Generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        keys = sorted(set().union(*allgather_objects(sorted(groups))))  # every process runs every group
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self._rank != 0, desc="jaxrl generate_until")
        for key in keys:
            indices = groups.get(key, [])
            texts = self._generate([requests[i].args[0] for i in indices], json.loads(key))
            for i, text in zip(indices, texts, strict=True):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Continuations of `contexts` under one set of generation kwargs (until, max_gen_toks, do_sample,
        temperature, top_p, top_k), in their order."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.eos_text)
        max_new = int(kwargs.pop("max_gen_toks"))
        sampled = bool(kwargs.get("do_sample"))
        temperature = float(kwargs.get("temperature", 1.0) if sampled else 0.0)
        if sampled and temperature <= 0:
            temperature = 1.0  # do_sample without a temperature: transformers' default
        top_p = float(kwargs.get("top_p") or 1.0) if sampled else 1.0
        top_k = int(kwargs.get("top_k") or 0) if sampled else 0
        max_context = self._max_length - max_new
        if max_context <= 0:
            raise ConfigError(
                f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self._max_length}"
            )
        encoded = [self.tok_encode(c, left_truncate_len=max_context) for c in contexts]
        lengths = np.asarray([len(e) for e in encoded], np.int64)
        order = np.argsort(-lengths, kind="stable")
        B = self._rows
        batches = [order[i : i + B] for i in range(0, len(order), B)]
        widths = self._agree([bucket_width(lengths, b, self.bucket, max_context) for b in batches])
        pad = self.tok.pad_id
        texts: list = [None] * len(contexts)
        for k, width in enumerate(widths):
            chunk = batches[k] if k < len(batches) else np.zeros((0,), np.int64)
            prompts = [encoded[i] for i in chunk] + [[pad]] * (B - len(chunk))  # filler rows, dropped below
            ids, mask = sampling.left_pad(prompts, pad, width=width)
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._generate_calls)
            self._generate_calls += 1
            with sharding.use_mesh(self.mesh, self.mesh_preset):
                tokens, _, out_mask = sampling.sample(
                    self.loaded.graphdef,
                    self.loaded.params,
                    self._global(ids),
                    self._global(mask),
                    key,
                    np.float32(temperature),
                    max_new=max_new,
                    eos_id=self.tok.eos_id,
                    pad_id=pad,
                    top_p=top_p,
                    top_k=top_k,
                )
            tokens, out_mask = self._fetch(tokens), self._fetch(out_mask)
            for row, i in enumerate(chunk):
                generated = tokens[row, : int(out_mask[row].sum())]
                texts[i] = postprocess_generated_text(
                    self.tok_decode(generated), stop=until, think_end_token=None
                )
        return texts
