"""A reward model for evaluation: loaded once, placed on a mesh, scoring (prompt, response text) in batches.

The RM is a finished jaxrl run of the `rm` stage or an HF *ForSequenceClassification checkpoint directory (the
reward models jaxrl loads for RL, `jaxrl.rewards`). A pair is tokenised as jaxrl trains reward models
(`jaxrl.data.tokenize`): the prompt in the RM's chat template ending with its generation prompt, then the
assistant turn; the score is read at the completion's last token (its end-of-turn when it has one).

Multi-host: every process is handed the same pairs and encodes and orders them alike, so all agree on the
sequence of batches and widths; each places only the rows of a global batch that its devices hold, and every
process gets every score back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxrl.config import ConfigError


def reward_tokenizer(source: Path):
    """The chat tokenizer (encode_prompt / encode_completion) of a reward-model run dir or HF checkpoint."""
    from jaxrl import config as config_lib
    from jaxrl.eval import model as model_lib
    from jaxrl.models.hf import is_hf_dir

    if is_hf_dir(source):
        tok = model_lib.tokenizer_from(source)
    else:
        run_cfg = config_lib.from_dict(json.loads((source / "config.json").read_text()))
        tok = model_lib.run_tokenizer(source, run_cfg)
    if tok is None:
        raise ConfigError(f"reward model {source}: no tokenizer.json")
    return tok.chat if hasattr(tok, "chat") else tok.tok


def check_reward_model_dir(source: str | Path) -> Path:
    """The directory of a finished `rm` run or an HF checkpoint, or a one-line error naming it."""
    from jaxrl import checkpoint
    from jaxrl.models.hf import is_hf_dir

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"reward model {source}: no such directory")
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"reward model {source} is neither a jaxrl run directory nor an HF checkpoint (no config.json)"
        )
    if not is_hf_dir(source) and not checkpoint.final_params_dir(source).exists():
        raise ConfigError(f"reward model {source}: the run has not finished (no final/params)")
    return source


def _bounded(tok, messages, keep: int, what: str) -> list[int]:
    """A prompt's last `keep` ids or a completion's first `keep`, tokenising only what can be kept when the
    tokenizer can (as jaxrl.data.tokenize does for training)."""
    bounded = getattr(tok, f"encode_{what}_bounded", None)
    ids = bounded(messages, keep)[0] if bounded is not None else getattr(tok, f"encode_{what}")(messages)
    return list(ids[-keep:] if what == "prompt" else ids[:keep])


class RewardScorer:
    """A reward model loaded once and placed on a mesh, scoring (prompt messages, response text) in batches of
    similar length (widths in multiples of `bucket`: one compile per width).

    Truncation as the `rm` stage's "truncate" policy: the prompt keeps its last `max_prompt_len` tokens, the
    completion its first `max_len` - prompt tokens (it then loses its end-of-turn token)."""

    def __init__(
        self,
        source: str | Path,
        *,
        mesh=None,
        preset: str = "fsdp",
        dtype: str | None = None,
        batch_size: int = 16,
        max_len: int = 4096,
        max_prompt_len: int = 2048,
        bucket: int = 64,
    ):
        from jaxrl import sharding
        from jaxrl.config import MeshConfig
        from jaxrl.models import init as model_init

        self.source = check_reward_model_dir(source)
        if max_prompt_len >= max_len:
            raise ConfigError(f"max_prompt_len {max_prompt_len} leaves no room for a response in {max_len}")
        self.mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(preset=preset))
        self.preset = preset
        params, cfg = model_init.load_run_params(self.source, self.mesh, preset)
        if cfg.head != "scalar":
            raise ConfigError(f"reward model {self.source} is not a reward model (no scalar head)")
        if dtype:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        self.params, self.config = params, dataclasses.replace(cfg, remat="none")
        self.graphdef, _ = model_init.abstract_model(self.config)
        self.tok = reward_tokenizer(self.source)
        divisor = sharding.batch_divisor(self.mesh, preset)
        self.batch_size = -(-max(1, batch_size) // divisor) * divisor
        self.placement = sharding.batch_sharding(self.mesh, preset)
        self.max_len, self.max_prompt_len, self.bucket = int(max_len), int(max_prompt_len), int(bucket)

    def encode(self, prompt, response: str) -> tuple[list[int], list[int], bool]:
        """(prompt ids, completion ids, truncated) as the RM reads them."""
        from jaxrl.data.records import Message

        prompt_ids = _bounded(self.tok, list(prompt), self.max_prompt_len + 1, "prompt")
        cut = len(prompt_ids) > self.max_prompt_len
        prompt_ids = prompt_ids[-self.max_prompt_len :]
        keep = self.max_len - len(prompt_ids)
        completion = _bounded(self.tok, [Message("assistant", response)], keep + 1, "completion")
        return prompt_ids, completion[:keep], cut or len(completion) > keep

    def score(self, prompts: list, responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores [N] float32, truncated [N] bool) of each (prompt messages, response text)."""
        from jaxrl import sampling
        from jaxrl.data.pipeline import bucket_width
        from jaxrl.rewards import score_responses

        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        n = len(encoded)
        scores, truncated = np.zeros(n, np.float32), np.asarray([e[2] for e in encoded], bool)
        prompt_len = np.asarray([len(e[0]) for e in encoded], np.int64)
        completion_len = np.asarray([max(1, len(e[1])) for e in encoded], np.int64)
        order = np.argsort(-(prompt_len + completion_len), kind="stable")
        B, pad = self.batch_size, self.tok.pad_id
        pending = []
        for start in range(0, n, B):
            chunk = order[start : start + B]
            P = bucket_width(prompt_len, chunk, self.bucket, self.max_prompt_len)
            N = bucket_width(completion_len, chunk, self.bucket, self.max_len)
            rows = [encoded[i] for i in chunk] + [encoded[chunk[-1]]] * (B - len(chunk))  # filler, dropped
            ids, mask = sampling.left_pad([r[0] for r in rows], pad, width=P)
            response = np.full((B, N), pad, np.int32)
            response_mask = np.zeros((B, N), np.int32)
            for row, (_, completion, _) in enumerate(rows):
                response[row, : len(completion)], response_mask[row, : len(completion)] = completion, 1
            arrays = [self._global(x) for x in (ids, mask, response, response_mask)]
            out = score_responses(self.graphdef, self.params, *arrays, active_mesh=(self.mesh, self.preset))
            pending.append((chunk, out))
        for chunk, out in pending:  # fetched after every call is dispatched: the device never waits
            scores[chunk] = _fetch(out)[: len(chunk)]
        return scores, truncated

    def _global(self, batch_BT: np.ndarray):
        """The global batch from the whole host array every process holds: each process places only the rows
        its own devices hold (all of them on one process)."""
        import jax

        return jax.make_array_from_callback(batch_BT.shape, self.placement, lambda index: batch_BT[index])


def _fetch(x) -> np.ndarray:
    """Every row of a batch-sharded output [B] float32 on every process (gathered across hosts)."""
    import jax

    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)
