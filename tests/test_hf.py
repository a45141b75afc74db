"""HF checkpoint interop: logits parity with transformers on tiny random checkpoints (sharded and not),
reward-model pooling, exact round trips, sharded files, and clear errors."""

import dataclasses
import itertools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: every checkpoint is built here

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jaxrl.config import MeshConfig
from jaxrl.models import hf, hf_weights
from jaxrl.sharding import make_mesh, use_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD = 128, 0
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA unless a case says otherwise
    intermediate_size=128,
    max_position_embeddings=256,
    attn_implementation="eager",
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
# name -> (config class, model class, config kwargs). The llama3 case uses a short original context so that
# most RoPE frequencies are rescaled within a 16-token test sequence.
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied_mha": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=True, num_key_value_heads=4),
    ),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_theta=1e6)),
    # Sliding windows shorter than the 16-token test sequences: every Mistral layer, Qwen2's from layer 1 on.
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3_head_dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),  # != 64 / 4
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(eos_token_id=1, pad_token_id=0)),
    "llama_rm": ("LlamaConfig", "LlamaForSequenceClassification", dict(num_labels=1, pad_token_id=PAD)),
    "qwen2_rm": ("Qwen2Config", "Qwen2ForSequenceClassification", dict(num_labels=1, pad_token_id=PAD)),
    "qwen3_rm": ("Qwen3Config", "Qwen3ForSequenceClassification", dict(num_labels=1, pad_token_id=PAD)),
}
TOL = 1e-4


def _randomize(model, seed):
    """Random weights everywhere (HF initialises biases to 0 and norms to 1, which would hide layout bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


def build_hf(case, directory):
    """A tiny random transformers model of `case`, saved to `directory`."""
    config_cls, model_cls, kwargs = CASES[case]
    config = getattr(transformers, config_cls)(**{**BASE, **kwargs})
    model = getattr(transformers, model_cls)(config).eval()
    _randomize(model, seed=sorted(CASES).index(case))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (torch model, checkpoint dir), built on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            directory = tmp_path_factory.mktemp(case)
            cache[case] = (build_hf(case, directory), directory)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tp"))


def tokens(seed=0, B=4, T=16):
    return np.random.RandomState(seed).randint(1, VOCAB, (B, T)).astype(np.int32)


def hf_out(model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()


def our_out(cfg, params, ids, mesh=None):
    graphdef, _ = hf.abstract_model(cfg)

    @jax.jit
    def forward(params, ids):
        return nnx.merge(graphdef, params)(ids)

    if mesh is None:
        return np.asarray(forward(params, jnp.asarray(ids)))
    with use_mesh(mesh, "fsdp_tp"):
        return np.asarray(forward(params, jnp.asarray(ids)))


def right_padded(seed=1):
    """A batch with rows of different lengths, right-padded with PAD, and its real-token mask."""
    ids = tokens(seed, B=4, T=12)
    mask = np.ones_like(ids)
    for b, length in enumerate((12, 7, 3, 10)):
        ids[b, length:] = PAD
        mask[b, length:] = 0
    return ids, mask


LM_CASES = [c for c in CASES if not c.endswith("_rm")]
RM_CASES = [c for c in CASES if c.endswith("_rm")]


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", LM_CASES)
def test_lm_logits_match_transformers(case, sharded, checkpoints, mesh):
    model, directory = checkpoints(case)
    cfg, params = hf.load_hf(directory, mesh=mesh if sharded else None, preset="fsdp_tp")
    assert cfg.head == "lm" and cfg.dtype == "float32"
    ids = tokens()
    ref = hf_out(model, ids)
    err = np.abs(our_out(cfg, params, ids, mesh if sharded else None) - ref).max()
    print(f"{case} sharded={sharded} max|diff|={err:.2e} (max|logit|={np.abs(ref).max():.2f})")
    assert err < TOL


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", RM_CASES)
def test_reward_scores_at_last_non_pad_token(case, sharded, checkpoints, mesh):
    model, directory = checkpoints(case)
    cfg, params = hf.load_hf(directory, mesh=mesh if sharded else None, preset="fsdp_tp")
    assert cfg.head == "scalar"
    ids, mask = right_padded()
    scores_BT = our_out(cfg, params, ids, mesh if sharded else None)
    assert scores_BT.shape == ids.shape
    ours_B = np.asarray(hf.last_token_scores(jnp.asarray(scores_BT), jnp.asarray(mask)))
    ref_B = hf_out(model, ids, mask)[:, 0]  # transformers pools at the rightmost token != pad_token_id
    err = np.abs(ours_B - ref_B).max()
    print(f"{case} sharded={sharded} max|diff|={err:.2e} (max|score|={np.abs(ref_B).max():.2f})")
    assert err < TOL


def test_sharded_load_places_params_in_their_layout(checkpoints, mesh):
    _, directory = checkpoints("qwen2_bias")
    _, params = hf.load_hf(directory, mesh=mesh, preset="fsdp_tp")
    assert params["layers"]["mlp"]["gate"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["layers"]["attn"]["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_last_token_scores_left_and_right_padding():
    scores_BT = jnp.arange(12.0).reshape(3, 4)
    mask_BT = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(hf.last_token_scores(scores_BT, mask_BT), [1.0, 7.0, 8.0])


def test_llama3_rope_frequencies_match_transformers(checkpoints):
    from jaxrl.models.transformer import rope_frequencies

    model, directory = checkpoints("llama3_rope")
    cfg, _ = hf.load_hf(directory)
    assert cfg.rope_scaling == "llama3" and cfg.rope_original_max_positions == 32
    ref = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_frequencies(cfg), ref, rtol=1e-6)
    assert not np.allclose(rope_frequencies(dataclasses.replace(cfg, rope_scaling="none")), ref)


@pytest.mark.parametrize("case", LM_CASES + ["llama_rm"])
def test_round_trip_is_exact_and_transformers_reads_it(case, checkpoints, tmp_path):
    model, directory = checkpoints(case)
    cfg, params = hf.load_hf(directory)
    original_config = hf.read_hf_config(directory)
    ids_keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    token_ids = {k: original_config[k] for k in ids_keys if original_config.get(k) is not None}
    arch = original_config["architectures"][0]
    hf.save_hf(tmp_path, cfg, params, architecture=arch, config_overrides=token_ids)
    cfg2, params2 = hf.load_hf(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    original = load_file(directory / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
    # transformers itself loads what we wrote and computes the same outputs.
    auto = (
        transformers.AutoModelForSequenceClassification
        if cfg.head == "scalar"
        else transformers.AutoModelForCausalLM
    )
    reloaded = auto.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = tokens(2)
    np.testing.assert_allclose(hf_out(reloaded, ids), hf_out(model, ids), atol=1e-6)


def test_sharded_save_writes_an_index_and_loads_exactly(checkpoints, tmp_path, mesh):
    model, directory = checkpoints("qwen3_head_dim")
    cfg, params = hf.load_hf(directory, mesh=mesh, preset="fsdp_tp")
    hf.save_hf(tmp_path, cfg, params, max_shard_bytes=40_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / hf.WEIGHTS_FILE).exists()
    cfg2, params2 = hf.load_hf(tmp_path, mesh=mesh, preset="fsdp_tp")
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = tokens(3)
    np.testing.assert_allclose(hf_out(reloaded, ids), hf_out(model, ids), atol=1e-6)


def test_bfloat16_load_and_save(checkpoints, tmp_path):
    _, directory = checkpoints("llama")
    cfg, params = hf.load_hf(directory, dtype="bfloat16", param_dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and params["embed"]["embedding"].dtype == jnp.bfloat16
    hf.save_hf(tmp_path, cfg, params)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, params32 = hf.load_hf(tmp_path)  # bf16 file -> fp32 params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, params32)


def test_load_model_calls_lm_and_rm(checkpoints):
    lm_ref, lm_dir = checkpoints("qwen2_bias")
    lm = hf.load_model(lm_dir)
    ids = tokens(4)
    assert lm.tokenizer is None and lm.config.head == "lm"
    np.testing.assert_allclose(np.asarray(lm(ids)), hf_out(lm_ref, ids), atol=TOL)
    np.testing.assert_allclose(np.asarray(lm(ids[0])), hf_out(lm_ref, ids[:1])[0], atol=TOL)
    rm_ref, rm_dir = checkpoints("llama_rm")
    rm = hf.load_model(rm_dir)
    padded, mask = right_padded()
    ragged = [list(row[: m.sum()]) for row, m in zip(padded, mask, strict=True)]
    np.testing.assert_allclose(np.asarray(rm(ragged)), hf_out(rm_ref, padded, mask)[:, 0], atol=TOL)
    np.testing.assert_allclose(np.asarray(rm(padded, mask)), hf_out(rm_ref, padded, mask)[:, 0], atol=TOL)


def left_padded(seed=2, lengths=(12, 7, 3, 10)):
    """A batch with rows of different lengths, left-padded with PAD (as prompts are), and its real mask."""
    ids = tokens(seed, B=len(lengths), T=max(lengths))
    mask = np.ones_like(ids)
    for b, length in enumerate(lengths):
        ids[b, : ids.shape[1] - length] = PAD
        mask[b, : ids.shape[1] - length] = 0
    return ids, mask


@pytest.mark.parametrize("case", ["llama", "mistral_window", "qwen2_window", "olmo2", "llama_rm", "qwen2_rm"])
def test_load_model_honours_left_padding(case, checkpoints):
    model, directory = checkpoints(case)
    loaded = hf.load_model(directory)
    ids, mask = left_padded()
    ours = np.asarray(loaded(ids, mask))
    ref = hf_out(model, ids, mask)  # transformers with the same attention_mask (its own position ids)
    # Each real row alone, unpadded: what the padded batch must reproduce.
    alone = [(row[m == 1], np.asarray(loaded(row[m == 1]))) for row, m in zip(ids, mask, strict=True)]
    if loaded.config.head == "scalar":
        np.testing.assert_allclose(ours, ref[:, 0], atol=TOL)
        np.testing.assert_allclose(ours, [score for _, score in alone], atol=TOL)
        np.testing.assert_allclose(ours, [hf_out(model, row[None])[0, 0] for row, _ in alone], atol=TOL)
        return
    for b, (row, logits) in enumerate(alone):
        real = mask[b] == 1
        np.testing.assert_allclose(ours[b, real], ref[b, real], atol=TOL, err_msg=f"row {b}")
        np.testing.assert_allclose(ours[b, real], logits, atol=TOL, err_msg=f"row {b}")
        np.testing.assert_allclose(logits, hf_out(model, row[None])[0], atol=TOL, err_msg=f"row {b}")
    # The window cases' rows are longer than the window, so a wrong window position would show here.
    assert loaded.config.sliding_window == 0 or max(mask.sum(1)) > loaded.config.sliding_window


def _hf_config(case):
    config_cls, model_cls, kwargs = CASES[case]
    return getattr(transformers, config_cls)(**{**BASE, **kwargs}).to_dict() | {"architectures": [model_cls]}


def test_config_reads_transformers_4_and_5_rope_spellings():
    v5 = _hf_config("llama3_rope")
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(
        rope_theta=500000.0,
        rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}},
    )
    assert hf.config_from_hf(v4) == hf.config_from_hf(v5)
    no_kv = {k: v for k, v in _hf_config("llama").items() if k != "num_key_value_heads"}
    assert hf.config_from_hf(no_kv).kv_heads == 4


def test_unsupported_architecture_is_a_clear_error(checkpoints, tmp_path):
    _, directory = checkpoints("llama")
    config = hf.read_hf_config(directory) | {"architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.HFCheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
        hf.load_hf(tmp_path)
    with pytest.raises(hf.HFCheckpointError, match="rope type 'yarn'"):
        hf.config_from_hf(
            hf.read_hf_config(directory) | {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
        )


def _rewrite(directory, tmp_path, edit_tensors=None, edit_config=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tensors = load_file(directory / "model.safetensors")
    config = hf.read_hf_config(directory)
    save_file(edit_tensors(tensors) if edit_tensors else tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return tmp_path


def test_missing_tensor_is_a_clear_error(checkpoints, tmp_path):
    _, directory = checkpoints("llama")
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = _rewrite(directory, tmp_path, edit_tensors=lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(hf.HFCheckpointError, match=f"missing tensor '{name}'.*layers/attn/k/kernel"):
        hf.load_hf(bad)


def test_shape_mismatch_and_unused_tensors_are_clear_errors(checkpoints, tmp_path):
    _, directory = checkpoints("llama")
    bad = _rewrite(directory, tmp_path / "a", edit_config=lambda c: c | {"intermediate_size": 96})
    with pytest.raises(hf.HFCheckpointError, match=r"mlp\.\w+_proj\.weight' has shape"):
        hf.load_hf(bad)
    extra = "model.layers.0.self_attn.o_proj.bias"
    bad = _rewrite(directory, tmp_path / "b", edit_tensors=lambda t: t | {extra: np.zeros(64, np.float32)})
    with pytest.raises(hf.HFCheckpointError, match="does not use.*o_proj.bias"):
        hf.load_hf(bad)


def test_save_refuses_an_architecture_that_cannot_hold_the_model(checkpoints, tmp_path):
    _, directory = checkpoints("qwen3_head_dim")
    cfg, params = hf.load_hf(directory)
    with pytest.raises(hf.HFCheckpointError, match="LlamaForCausalLM cannot represent.*qk_norm"):
        hf.save_hf(tmp_path, cfg, params, architecture="LlamaForCausalLM")


class _ArrayReader:
    """Stands in for the safetensors reader: serves blocks of in-memory HF tensors."""

    def __init__(self, tensors):
        self.tensors = tensors

    def block(self, name, index):
        return self.tensors[name][index]


@pytest.mark.parametrize(
    "path,fan_in,shape",
    [
        ("layers/attn/q/kernel", 1, (6, 4, 3)),  # [D, H, E] from [H*E, D]
        ("layers/attn/o/kernel", 2, (4, 3, 6)),  # [H, E, D] from [D, H*E]
        ("layers/mlp/gate/kernel", 1, (6, 8)),
        ("layers/attn/q/bias", 0, (4, 3)),  # [H, E] from [H*E]
        ("embed/embedding", 0, (10, 6)),
    ],
)
def test_partial_reads_equal_slices_of_the_whole_tensor(path, fan_in, shape):
    m = hf.TensorMap(path, "t", fan_in=fan_in)
    ours = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    stored = (
        hf.to_hf_layout(ours, fan_in).reshape(-1)
        if m.path.endswith("/bias")
        else hf.to_hf_layout(ours, fan_in)
    )
    np.testing.assert_array_equal(hf.from_hf_layout(stored, shape, fan_in), ours)
    reader = _ArrayReader({"t": stored})
    cuts = [[slice(None), slice(0, n // 2), slice(n // 2, n)] for n in shape]
    for idx in itertools.product(*cuts):  # every mix of whole and split dims, split groups included
        block = hf_weights._read_block(reader, "t", idx, shape, m)
        np.testing.assert_array_equal(block, ours[idx], err_msg=str(idx))


def _word_tokenizer(directory):
    """A word-level tokenizer.json + tokenizer_config.json (ChatML template) of VOCAB tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials) - 1)] + ["\n"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = {"eos_token": "<|im_end|>", "pad_token": "<pad>", "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_save_copies_tokenizer_and_load_model_uses_it(checkpoints, tmp_path):
    from jaxrl.data.chat import HFChatTokenizer
    from jaxrl.data.records import messages

    _, directory = checkpoints("llama_rm")
    (tmp_path / "tok").mkdir()
    tokenizer_dir = _word_tokenizer(tmp_path / "tok")
    cfg, params = hf.load_hf(directory)
    out = hf.save_hf(tmp_path / "rm", cfg, params, tokenizer_dir=tokenizer_dir)
    config = hf.read_hf_config(out)
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert (config["pad_token_id"], config["eos_token_id"]) == (0, 2)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert not (out / "generation_config.json").exists()  # a reward model does not generate
    rm = hf.load_model(out)
    assert isinstance(rm.tokenizer, HFChatTokenizer)
    ids, _ = rm.tokenizer.encode_conversation(messages(("user", "w5"), ("assistant", "w7")))
    assert max(ids) < VOCAB and rm(ids).shape == () and np.isfinite(rm(ids))
    lm_cfg, lm_params = hf.load_hf(checkpoints("llama")[1])
    lm_out = hf.save_hf(tmp_path / "lm", lm_cfg, lm_params, tokenizer_dir=tokenizer_dir)
    generation = json.loads((lm_out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0


def test_load_and_save_make_no_hidden_transfers(checkpoints, tmp_path, mesh):
    _, directory = checkpoints("olmo2")
    with jax.transfer_guard("disallow"):
        cfg, params = hf.load_hf(directory, mesh=mesh, preset="fsdp_tp")
        hf.save_hf(tmp_path, cfg, params)


@pytest.mark.parametrize("case", ["mistral_window", "qwen2_window"])
def test_sliding_window_is_loaded_sampled_and_exported(case, checkpoints, tmp_path):
    from jaxrl import sampling

    model, directory = checkpoints(case)
    cfg, params = hf.load_hf(directory)
    window = model.config.sliding_window
    assert (cfg.sliding_window, cfg.window_layers) == ((5, 0) if case == "mistral_window" else (4, 1))
    full = dataclasses.replace(cfg, sliding_window=0)
    ids = tokens(5)
    assert np.abs(our_out(full, params, ids) - hf_out(model, ids)).max() > 1e-3  # the window matters here
    # Greedy KV-cache sampling (prompt + new tokens > window) follows transformers' own greedy decoding.
    prompts = [list(range(3, 10)), list(range(20, 23)), list(range(40, 46))]
    prompt_ids, prompt_mask = sampling.left_pad(prompts, PAD)
    graphdef, _ = hf.abstract_model(cfg)
    out, _, out_mask = sampling.sample(
        graphdef,
        params,
        jnp.asarray(prompt_ids),
        jnp.asarray(prompt_mask),
        jax.random.key(0),
        0.0,
        max_new=3 * window,
        eos_id=VOCAB,
        pad_id=PAD,
    )
    assert np.asarray(out_mask).all()
    model.generation_config.eos_token_id = None
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=3 * window,
                pad_token_id=PAD,
            )
        np.testing.assert_array_equal(
            np.asarray(out)[row], ref[0, len(prompt) :].numpy(), err_msg=f"row {row}"
        )
    # Exported with its window: transformers reads the same model back.
    hf.save_hf(tmp_path, cfg, params)
    saved = hf.read_hf_config(tmp_path)
    assert saved["sliding_window"] == window and hf.load_hf(tmp_path)[0] == cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_out(reloaded, ids), hf_out(model, ids), atol=1e-6)
