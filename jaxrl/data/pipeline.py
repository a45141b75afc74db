"""Stage datasets as token arrays, and a random-access batch order (grain) whose position is the step.

The synthetic world's records for a stage are made here; file data (one source or a mixture) is read by
`jaxrl.data.sources`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax
import numpy as np

from jaxrl.config import Config, ConfigError
from jaxrl.data import tokenize
from jaxrl.data.sources import DEFAULT_LIST_SIZE, file_records, is_listwise, mixture_entries


@dataclasses.dataclass
class StageData:
    """Tokenised train/eval arrays for one stage, with the tokenizer and what tokenisation dropped."""

    tokenizer: object
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    report: list[str]


ON_POLICY = "on_policy"  # synthetic_kind: pairs sampled from the run's init_from policy, labelled as "clean"


def _synthetic_records(cfg: Config, responder=None) -> tuple[list, list, list[str]]:
    """(train records, held-out records, report lines: what the data is and its measured noise)."""
    from jaxrl import synthetic

    d = cfg.data
    if cfg.stage == "sft":
        # Held-out demonstrations on validation-split texts: the NLL gap to train is on unseen phrasings.
        return (
            synthetic.make_sft_dataset(d.num_train, seed=cfg.seed),
            synthetic.make_sft_dataset(d.num_eval, seed=cfg.seed + 10_000, split="validation"),
            [],
        )
    if d.list_size:
        return _synthetic_lists(cfg)
    if d.synthetic_kind == ON_POLICY:
        if responder is None:
            raise ConfigError(
                "data.synthetic_kind=on_policy samples its pairs from train.init_from's policy: "
                "set train.init_from"
            )
        # Twice the prompts: pairs of identical or equally good samples are left out (counted).
        prompts = synthetic.make_prompt_set("in_domain", 2 * d.num_train, seed=cfg.seed)
        first, second = responder(prompts, 1), responder(prompts, 2)
        pairs = synthetic.make_on_policy_dataset(prompts, first, second, seed=cfg.seed)
        train = synthetic.LabelledPairs(pairs[: d.num_train], pairs.stats)
    else:
        train = synthetic.make_preference_dataset(d.synthetic_kind, d.num_train, seed=cfg.seed)
    stats = synthetic.dataset_stats(train)
    made = {k: v for k, v in sorted(train.stats.items()) if k not in stats and isinstance(v, (int, float))}
    facts = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in made.items())
    report = [
        f"synthetic {d.synthetic_kind} pairs: {len(train)}; against gold: "
        f"flip rate {stats['flip_rate']:.3f}, tie rate {stats['tie_rate']:.3f}, "
        f"length bias {stats['length_bias']:+.3f}" + (f" ({facts})" if facts else "")
    ]
    # Held-out pairs are labelled by the gold reward, so eval accuracy measures agreement with the truth.
    return train, synthetic.make_gold_pairs(d.num_eval, seed=cfg.seed + 10_000), report


def _synthetic_lists(cfg: Config) -> tuple[list, list, list[str]]:
    """Ranked lists of data.list_size responses per prompt (the kind's labeller as a Plackett-Luce ranking):
    kept whole for a listwise loss, else binarised by data.binarize into pairs; held out: gold-ranked lists,
    kept or binarised the same way (so both kinds of loss are evaluated on the same responses)."""
    from jaxrl import synthetic
    from jaxrl.data import binarize

    d = cfg.data
    if d.synthetic_kind == ON_POLICY:
        raise ConfigError(
            "data.list_size: ranked lists are made for the labelled kinds "
            f"{synthetic.DATASETS}, not on_policy"
        )
    ranked = synthetic.make_ranked_dataset(d.synthetic_kind, d.num_train, seed=cfg.seed, k=d.list_size)
    stats = ranked.stats
    report = [
        f"synthetic {d.synthetic_kind} ranked lists: {len(ranked)} of {d.list_size}; against gold over "
        f"their pairs: flip rate {stats['pair_flip_rate']:.3f} (untied pairs), tie rate "
        f"{stats['pair_tie_rate']:.3f}"
    ]
    gold = synthetic.make_gold_lists(d.num_eval, seed=cfg.seed + 10_000, k=d.list_size)
    if is_listwise(cfg):
        train, _ = binarize.to_lists(ranked, d.list_size, seed=cfg.seed)
        return train, binarize.to_lists(gold, d.list_size)[0], report
    pairs, dropped = binarize.binarize(ranked, d.binarize, seed=cfg.seed)
    report.append(f"binarised ({d.binarize}) to {len(pairs)} pairs, dropped {dict(dropped) or 'none'}")
    return pairs, binarize.binarize(gold, d.binarize, seed=cfg.seed)[0], report


def check_config(cfg: Config) -> None:
    """The data section's names resolve (ConfigError otherwise): the synthetic kind (for the preference
    stages), each mixture entry, a file source's reader."""
    from jaxrl.data.readers import READERS
    from jaxrl.synthetic import DATASETS

    if cfg.data.source == "synthetic" and cfg.stage != "sft":
        kinds = (*DATASETS, ON_POLICY)
        if cfg.data.synthetic_kind not in kinds:
            raise ConfigError(f"data.synthetic_kind must be one of {kinds}, got {cfg.data.synthetic_kind!r}")
    if cfg.data.mixture:
        mixture_entries(cfg.data.mixture)  # raises ConfigError naming the bad entry
    elif cfg.data.source != "synthetic" and cfg.data.format not in READERS:
        raise ConfigError(
            f"data.format must name a reader for file data, one of {sorted(READERS)}; got {cfg.data.format!r}"
        )


def load_tokenizer(cfg: Config):
    """The synthetic world's tokenizer, or the chat tokenizer of a local checkpoint directory."""
    if cfg.data.source == "synthetic":
        from jaxrl.synthetic import SyntheticTokenizer

        return SyntheticTokenizer()
    from jaxrl.data.chat import HFChatTokenizer

    directory = cfg.data.tokenizer
    if not directory and cfg.train.init_from and (Path(cfg.train.init_from) / "tokenizer.json").exists():
        directory = cfg.train.init_from  # the starting checkpoint's own tokenizer
    if not directory:
        raise ConfigError("data.tokenizer must name a local directory with tokenizer.json for file data")
    return HFChatTokenizer.from_dir(directory)


def encode(records, tok, cfg: Config):
    """Tokenises records for the stage: conversations for sft, pairs for rm and dpo, unpaired for kto."""
    d = cfg.data
    if cfg.stage == "sft":
        return tokenize.encode_conversations(records, tok, max_len=d.max_len, truncation=d.truncation)
    if records and isinstance(records[0], tuple):  # ranked lists (binarize.to_lists)
        return tokenize.encode_lists(
            records,
            tok,
            k=d.list_size or DEFAULT_LIST_SIZE,
            max_len=d.max_len,
            max_prompt_len=d.max_prompt_len,
            truncation=d.truncation,
        )
    if records and not hasattr(records[0], "chosen"):
        return tokenize.encode_unpaired(
            records, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len, truncation=d.truncation
        )
    return tokenize.encode_pairs(
        records, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len, truncation=d.truncation
    )


def build_stage_data(cfg: Config, responder=None) -> StageData:
    """Reads, tokenises and splits the stage's data. `responder(prompts, seed) -> texts` samples the policy
    that on-policy synthetic pairs come from."""
    tok = load_tokenizer(cfg)
    report = []
    if cfg.data.source == "synthetic":
        train_records, eval_records, report = _synthetic_records(cfg, responder)
    else:
        train_records, eval_records, lines = file_records(cfg)
        report += lines
    train, train_stats = encode(train_records, tok, cfg)
    held_out, eval_stats = encode(eval_records, tok, cfg)
    report += [f"tokenised train: {train_stats.summary()}", f"tokenised eval: {eval_stats.summary()}"]
    if train["tokens"].shape[0] == 0:
        raise ConfigError(f"no training examples left after tokenisation: {train_stats.summary()}")
    if cfg.data.padding == "pack":
        n = train["tokens"].shape[0]
        train = pack(train, pad_id=tok.pad_id, seed=cfg.seed)
        rows = train["tokens"].shape[0]
        report.append(
            f"packed train: {n} conversations into {rows} rows of {train['tokens'].shape[1]} "
            f"({n / rows:.2f} per row, {padding_fraction(train):.1%} padding)"
        )
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    return StageData(tokenizer=tok, train=train, eval=held_out, report=report)


class BatchOrder:
    """Seeded, reshuffled-per-epoch batches of example indices; batch `step` is a pure function of the step,
    so resuming at a step continues the data stream exactly.

    With `lengths`, batches group examples of similar length (for length buckets): each epoch's shuffled order
    is cut into windows of `group` batches, each window sorted by length and cut into batches, and the epoch's
    batches shuffled. Every example still comes once per epoch (the remainder that fills no batch waits for
    the next epoch's draw), and a batch's rows are as random as the window they come from.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        lengths: np.ndarray | None = None,
        group: int = 64,
    ):
        self.num_examples, self.batch_size, self.seed, self.group = num_examples, batch_size, seed, group
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and num_examples < batch_size:
            raise ConfigError(f"{num_examples} examples cannot fill one batch of {batch_size}")
        self.dataset = (
            grain.MapDataset.source(np.arange(num_examples)).shuffle(seed=seed).repeat(None).batch(batch_size)
        )
        self._epoch: tuple[int, np.ndarray] | None = None

    def indices(self, step: int) -> np.ndarray:
        if self.lengths is None:
            return np.asarray(self.dataset[step])
        per_epoch = self.num_examples // self.batch_size
        epoch, k = divmod(step, per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._grouped_epoch(epoch, per_epoch))
        return self._epoch[1][k]

    def _grouped_epoch(self, epoch: int, per_epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_examples)[: per_epoch * self.batch_size]
        window = self.group * self.batch_size
        chunks = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunks.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        batches = np.concatenate(chunks).reshape(per_epoch, self.batch_size)
        return batches[rng.permutation(per_epoch)]


def host_batch(
    arrays: dict[str, np.ndarray], indices: np.ndarray, width: int | None = None
) -> dict[str, np.ndarray]:
    """This process's rows of a global batch (contiguous per-host shards of the index list), cut to `width`
    positions when given (see bucket_width: every process must pass the same one)."""
    n_proc, pid = jax.process_count(), jax.process_index()
    local = np.array_split(indices, n_proc)[pid]
    return {
        k: (v[local][..., :width] if width is not None and k in POSITION_KEYS else v[local])
        for k, v in arrays.items()
    }


# Arrays whose last axis is the position within a row (the ones bucketing cuts).
POSITION_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def used_lengths(loss_mask: np.ndarray) -> np.ndarray:
    """Positions of each row that matter to any loss: up to and including the last loss-mask position (rows
    are right-padded and attention is causal, so what follows it changes nothing). Shape: loss_mask's without
    T."""
    T = loss_mask.shape[-1]
    has = loss_mask.any(axis=-1)
    last = T - 1 - np.argmax(loss_mask[..., ::-1] != 0, axis=-1)
    return np.where(has, last + 1, 0)


def example_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Used positions of each example [N] (a pair's longer row); compute once, then cut batches with it."""
    lengths = used_lengths(arrays["loss_mask"])
    return lengths.max(axis=-1) if lengths.ndim == 2 else lengths


def bucket_width(lengths: np.ndarray, indices: np.ndarray, multiple: int, max_width: int) -> int:
    """The width a global batch is cut to: the smallest multiple of `multiple` that holds the longest example
    of the batch (`lengths` from example_lengths, read at the global indices so every process agrees), at most
    `max_width`."""
    longest = max(int(lengths[indices].max(initial=1)), 1)
    return min(max_width, -(-longest // multiple) * multiple)


def padding_fraction(arrays: dict[str, np.ndarray]) -> float:
    """Fraction of token positions that are padding (after the last used position of their row/segment)."""
    if "segment_ids" in arrays:
        return float(np.mean(arrays["segment_ids"] == 0))
    return 1.0 - float(used_lengths(arrays["loss_mask"]).sum()) / arrays["loss_mask"].size


def pack(arrays: dict[str, np.ndarray], *, pad_id: int, seed: int, window: int = 64) -> dict[str, np.ndarray]:
    """Packs right-padded rows {"tokens", "loss_mask"} [N, T] into fewer rows of T with "segment_ids" (1, 2,
    ... per conversation, 0 on padding) and "positions" (restarting at 0 in each conversation).

    Conversations are taken in a seeded random order and each goes into the fullest of the last `window` open
    rows that it fits (first fit within a window: near-full rows without sorting the data by length). Each
    conversation keeps only its used positions (used_lengths); its first position is no target, as nothing in
    its own conversation predicts it.
    """
    tokens, mask = arrays["tokens"], arrays["loss_mask"]
    N, T = tokens.shape
    lengths = used_lengths(mask)
    order = np.random.default_rng(seed).permutation(N)
    rows: list[list[int]] = []  # conversation indices per packed row
    room: list[int] = []
    open_rows: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n == 0:
            continue  # nothing to learn from (tokenisation already counted such drops)
        fits = [r for r in open_rows[-window:] if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: room[r])
        else:
            r = len(rows)
            rows.append([])
            room.append(T)
            open_rows.append(r)
        rows[r].append(int(i))
        room[r] -= n
        if room[r] == 0:
            open_rows.remove(r)
    out = {
        "tokens": np.zeros((len(rows), T), tokens.dtype),
        "loss_mask": np.zeros((len(rows), T), mask.dtype),
        "segment_ids": np.zeros((len(rows), T), np.int32),
        "positions": np.zeros((len(rows), T), np.int32),
    }
    out["tokens"][:] = pad_id
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            n = int(lengths[i])
            out["tokens"][r, at : at + n] = tokens[i, :n]
            out["loss_mask"][r, at : at + n] = mask[i, :n]
            out["loss_mask"][r, at] = 0
            out["segment_ids"][r, at : at + n] = seg
            out["positions"][r, at : at + n] = np.arange(n)
            at += n
    return out


def to_device(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assembles global device arrays from per-process rows."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
