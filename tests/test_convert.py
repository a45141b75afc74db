"""`jaxrl convert` both directions, and training that starts from an HF checkpoint directory."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrl import cli, convert  # noqa: E402
from jaxrl.metrics import read_metrics  # noqa: E402
from jaxrl.models import init  # noqa: E402


def _tiny_llama(path, vocab=256):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_convert_round_trip_through_a_run_directory(tmp_path):
    hf_dir = _tiny_llama(tmp_path / "hf")
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "final" / "params").exists()
    assert not convert.is_hf_dir(tmp_path / "run")
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    ids = np.random.default_rng(0).integers(0, 256, (2, 10))
    np.testing.assert_array_equal(_logits(hf_dir, ids), _logits(tmp_path / "back", ids))


def _read(path):
    return json.loads(path.read_text())


def _checkpoint(path, config_cls, model_cls, seed=0, generation=None, **kwargs):
    """A tiny transformers checkpoint of any architecture (and a custom generation config)."""
    base = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**base, **kwargs}))
    if generation is not None:
        model.generation_config = transformers.GenerationConfig(**generation)
    model.save_pretrained(path)
    return path


def test_round_trip_keeps_token_ids_generation_config_and_architecture(tmp_path):
    generation = dict(
        bos_token_id=1,
        eos_token_id=[2, 7],
        pad_token_id=0,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
        max_new_tokens=33,
    )
    # A Mistral with a window shorter than the test sequences: it must stay a windowed Mistral.
    hf_dir = _checkpoint(
        tmp_path / "hf",
        "MistralConfig",
        "MistralForCausalLM",
        generation=generation,
        sliding_window=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert _read(run / "hf.json") == {"architecture": "MistralForCausalLM", **ids}
    assert _read(run / "config.json")["model"]["sliding_window"] == 4
    assert _read(run / "generation_config.json") == _read(hf_dir / "generation_config.json")
    assert cli.main(["convert", str(run), str(tmp_path / "back")]) == 0
    source, back = _read(hf_dir / "config.json"), _read(tmp_path / "back" / "config.json")
    assert back["architectures"] == ["MistralForCausalLM"] and back["sliding_window"] == 4
    assert {k: back.get(k) for k in convert.SPECIAL_TOKEN_KEYS} == ids
    assert _read(tmp_path / "back" / "generation_config.json") == _read(hf_dir / "generation_config.json")
    reloaded = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert (reloaded.eos_token_id, reloaded.temperature, reloaded.max_new_tokens) == ([2, 7], 0.6, 33)
    assert source["model_type"] == back["model_type"] == "mistral"
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    np.testing.assert_array_equal(_logits(hf_dir, tokens), _logits(tmp_path / "back", tokens))


def test_reward_model_round_trip_keeps_its_pad_id(tmp_path):
    hf_dir = _checkpoint(
        tmp_path / "hf",
        "Qwen2Config",
        "Qwen2ForSequenceClassification",
        num_labels=1,
        pad_token_id=3,
        eos_token_id=5,
    )
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "run")]) == 0
    assert _read(tmp_path / "run" / "config.json")["stage"] == "rm"
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = _read(tmp_path / "back" / "config.json")
    assert back["architectures"] == ["Qwen2ForSequenceClassification"]
    assert (back["pad_token_id"], back["eos_token_id"]) == (3, 5)
    assert not (tmp_path / "back" / "generation_config.json").exists()
    ids = torch.tensor([[9, 8, 7, 3, 3], [4, 5, 6, 1, 2]])
    scores = []
    for d in (hf_dir, tmp_path / "back"):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32)
        with torch.no_grad():
            scores.append(model(ids).logits.numpy())
    np.testing.assert_array_equal(*scores)


def test_convert_overrides_both_ways(tmp_path):
    hf_dir = _tiny_llama(tmp_path / "hf")
    run = tmp_path / "run"
    argv = [
        "convert",
        str(hf_dir),
        str(run),
        "--set",
        "model.dtype=float32",
        "--set",
        "model.param_dtype=bfloat16",
        "--hf-set",
        "pad_token_id=0",
    ]
    assert cli.main(argv) == 0
    model = _read(run / "config.json")["model"]
    assert (model["dtype"], model["param_dtype"]) == ("float32", "bfloat16")
    assert _read(run / "hf.json")["pad_token_id"] == 0
    params, model_cfg = init.load_run_params(run, *_single_mesh())
    assert model_cfg.param_dtype == "bfloat16" and params["embed"]["embedding"].dtype == "bfloat16"
    back = tmp_path / "back"
    argv = ["convert", str(run), str(back), "--set", "mesh.preset=dp", "--hf-set", "eos_token_id=[2, 9]"]
    assert cli.main(argv) == 0
    config = _read(back / "config.json")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, [2, 9], 0)
    assert config["torch_dtype"] == "bfloat16"
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "f32")]) == 0
    argv = ["convert", str(tmp_path / "f32"), str(tmp_path / "bf16"), "--set", "model.param_dtype=bfloat16"]
    assert cli.main(argv) == 0
    assert _read(tmp_path / "bf16" / "config.json")["torch_dtype"] == "bfloat16"


def _one_line_error(capsys, *args):
    """`jaxrl convert *args` exits 2 with one line on stderr (no traceback); returns it."""
    capsys.readouterr()
    assert cli.main(["convert", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxrl convert: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unsupported_checkpoints_and_overrides_are_one_line_errors(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    assert "unsupported architecture ['GPT2LMHeadModel']" in _one_line_error(capsys, gpt2, tmp_path / "a")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    assert "unsupported architecture" in _one_line_error(capsys, bare, tmp_path / "b")
    gelu = _checkpoint(tmp_path / "gelu", "LlamaConfig", "LlamaForCausalLM", hidden_act="gelu")
    assert "hidden_act='gelu'" in _one_line_error(capsys, gelu, tmp_path / "c")
    two = _checkpoint(tmp_path / "two", "LlamaConfig", "LlamaForSequenceClassification", num_labels=2)
    # transformers 5 leaves the default two labels out of config.json: the score tensor's shape tells.
    assert "score.weight" in _one_line_error(capsys, two, tmp_path / "d")
    hf_dir = _tiny_llama(tmp_path / "hf")
    assert "model.hidden" in _one_line_error(capsys, hf_dir, tmp_path / "e", "--set", "model.hidden=64")
    assert not (tmp_path / "e" / "config.json").exists()
    assert "model.nope" in _one_line_error(capsys, hf_dir, tmp_path / "f", "--set", "model.nope=1")
    assert "stage=rm" in _one_line_error(capsys, hf_dir, tmp_path / "g", "--set", "stage=rm")
    assert "hidden_size" in _one_line_error(capsys, hf_dir, tmp_path / "h", "--hf-set", "hidden_size=64")
    run = convert.hf_to_run(hf_dir, tmp_path / "run")
    assert "loss.beta" in _one_line_error(capsys, run, tmp_path / "i", "--set", "loss.beta=1")
    assert "cannot represent" in _one_line_error(capsys, run, tmp_path / "j", "--hf-set", "hidden_size=64")
    assert "neither" in _one_line_error(capsys, tmp_path / "missing", tmp_path / "k")


def test_a_run_no_hf_architecture_can_hold_is_a_one_line_error(tmp_path, capsys):
    from jaxrl import checkpoint
    from jaxrl import config as config_lib
    from jaxrl.config import Config, ModelConfig

    cfg = Config(model=ModelConfig(vocab_size=64, hidden=32, qkv_bias=True, qk_norm="head"))
    run = tmp_path / "run"
    run.mkdir()
    config_lib.save(cfg, run / "config.json")
    checkpoint.save_params(checkpoint.final_params_dir(run), init.init_params(cfg.model, 0, *_single_mesh()))
    assert "cannot represent" in _one_line_error(capsys, run, tmp_path / "hf")


def test_convert_refuses_to_overwrite_a_run(tmp_path):
    hf_dir = _tiny_llama(tmp_path / "hf")
    convert.hf_to_run(hf_dir, tmp_path / "run")
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "run")]) == 2


@pytest.mark.slow
def test_sft_starts_from_an_hf_checkpoint_and_exports_back(tmp_path):
    hf_dir = _tiny_llama(tmp_path / "hf")
    workdir = tmp_path / "sft"
    argv = [
        "train",
        "--config",
        "experiments/tiny_pipeline.py",
        "--workdir",
        str(workdir),
        "--set",
        f"train.init_from={hf_dir}",
        "--set",
        "train.steps=6",
        "--set",
        "train.progress=false",
        "--set",
        "train.log_every=1",
        "--set",
        "data.num_train=64",
        "--set",
        "data.num_eval=32",
        "--set",
        "data.eval_prompts_per_domain=0",
        "--set",
        "model.dtype=float32",
    ]
    assert cli.main(argv) == 0
    resolved = json.loads((workdir / "config.json").read_text())["model"]
    assert (resolved["hidden"], resolved["layers"], resolved["mlp"]) == (32, 2, 64)  # from the checkpoint
    first = read_metrics(workdir)[0]["train/loss"]
    # Initialised from the checkpoint, the first loss is that of the HF model on the batch: ~log(256).
    assert abs(first - np.log(256)) < 0.5
    params, model_cfg = init.load_run_params(workdir, *_single_mesh())
    assert model_cfg.hidden == 32
    assert cli.main(["convert", str(workdir), str(tmp_path / "export")]) == 0
    # The run descends from hf_dir (train.init_from): the export keeps its token ids and generation config.
    exported_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (exported_config["bos_token_id"], exported_config["eos_token_id"]) == (1, 2)
    assert _read(tmp_path / "export" / "generation_config.json") == _read(hf_dir / "generation_config.json")
    ids = np.random.default_rng(1).integers(0, 228, (1, 12))
    exported = _logits(tmp_path / "export", ids)
    assert not np.allclose(exported, _logits(hf_dir, ids))  # trained weights, not the starting ones
    assert np.isfinite(exported).all()


def _single_mesh():
    import jax

    from jaxrl import sharding
    from jaxrl.config import MeshConfig

    return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), "fsdp"
