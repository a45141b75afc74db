"""Data from the config: a mixture of sources (data.mixture), aspect weights, min_margin, KTO from ratings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_fixtures import word_tokenizer

from jaxrl import config as config_lib
from jaxrl.config import ConfigError
from jaxrl.data import pipeline
from jaxrl.data import sources as data_sources
from jaxrl.data.records import PreferencePair, UnpairedExample
from jaxrl.validate import validate


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def sources(tmp_path):
    """Three public formats: TRL conversational pairs (40), HelpSteer3 (30, 10 of them ties) and UltraFeedback
    rated completions (20 prompts with 3 rated answers each)."""
    trl = [
        {
            "chosen": [msg("user", f"w{i % 40}"), msg("assistant", f"w{(i + 1) % 40}")],
            "rejected": [msg("user", f"w{i % 40}"), msg("assistant", f"w{(i + 2) % 40} w3")],
        }
        for i in range(40)
    ]
    helpsteer3 = [
        {
            "domain": "general",
            "language": "english",
            "context": [msg("user", f"w{i} w{i}")],
            "response1": f"w{i} w1",
            "response2": "w2",
            "overall_preference": (i % 3) - 1,
            "individual_preference": [],
        }
        for i in range(30)
    ]

    def completion(text, rating):
        annotations = {a: {"Rating": str(rating), "Rationale": "…"} for a in ("helpfulness", "honesty")}
        return {"response": text, "annotations": annotations, "overall_score": float(rating), "model": "m"}

    uf = [
        {
            "instruction": f"w{i} w5",
            "source": "evol_instruct",
            "completions": [completion("w6", 5), completion(f"w{i} w7", 3), completion("w8 w8", 1)],
        }
        for i in range(20)
    ]
    return {
        "trl": write_jsonl(tmp_path / "trl.jsonl", trl),
        "hs3": write_jsonl(tmp_path / "hs3.jsonl", helpsteer3),
        "uf": write_jsonl(tmp_path / "uf.jsonl", uf),
        "tokenizer": word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(40)]),
    }


def mixture(sources, **trl):
    return json.dumps(
        [
            {"source": str(sources["trl"]), "format": "trl_preference", **trl},
            {"source": str(sources["hs3"]), "format": "helpsteer3"},
            {"source": str(sources["uf"]), "format": "ultrafeedback", "binarize": "best_vs_worst"},
        ]
    )


def mixture_config(run_config, sources, stage="rm", **overrides):
    return validate(
        run_config(
            stage,
            **{
                "data.source": "mixture",
                "data.mixture": mixture(sources, count=24),
                "data.format": "",
                "data.tokenizer": str(sources["tokenizer"]),
                "data.num_train": 0,
                "data.num_eval": 8,
                **overrides,
            },
        )
    )


def test_a_three_source_mixture_reports_each_source(run_config, sources):
    data = pipeline.build_stage_data(mixture_config(run_config, sources))
    assert data.report[:4] == [
        f"read trl (trl_preference, {sources['trl']}): rows read 40 = used 40 + dropped 0",
        f"read hs3 (helpsteer3, {sources['hs3']}): rows read 30 = used 20 + dropped 10 (tie: 10)",
        f"read uf (ultrafeedback, {sources['uf']}): rows read 20 = used 20 + dropped 0; "
        "binarised (best_vs_worst) to 20 pairs, dropped none",
        "mixture of 64 records (trl: 24, hs3: 20, uf: 20)",
    ]
    assert data.train["tokens"].shape[:2] == (56, 2) and data.eval["tokens"].shape[:2] == (8, 2)


def test_mixture_weights_share_num_train_plus_num_eval(run_config, sources):
    cfg = mixture_config(run_config, sources, **{"data.num_train": 32})
    weighted = [dict(e, weight=w) for e, w in zip(json.loads(mixture(sources)), (2, 1, 1), strict=True)]
    cfg = config_lib.override(cfg, {"data.mixture": json.dumps(weighted)})
    records, report = data_sources.mixture_records(cfg)
    assert report[-1] == "mixture of 40 records (trl: 20, hs3: 10, uf: 10)" and len(records) == 40


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data.source": "synthetic"}, "go together"),
        ({"data.mixture": '[{"source": "a.jsonl", "format": "tulu3"}]'}, "must name a reader"),
        ({"data.mixture": '[{"source": "a.jsonl", "format": "shp", "weigth": 2}]'}, "unknown keys"),
        (
            {
                "data.mixture": '[{"source": "a", "format": "shp", "count": 1}, '
                '{"source": "b", "format": "shp", "weight": 1}]'
            },
            "counts and weights",
        ),
        ({"data.mixture": "{not json"}, "JSON list"),
    ],
)
def test_mixture_config_errors_name_the_entry(run_config, sources, change, message):
    with pytest.raises(ConfigError, match=message):
        mixture_config(run_config, sources, **change)


def test_kto_from_rated_data_and_min_margin_from_the_config(run_config, sources):
    base = {"data.source": str(sources["uf"]), "data.format": "ultrafeedback", "data.binarize": "all_pairs"}
    kto = validate(run_config("dpo", **base, **{"loss.name": "kto"}))
    read = lambda cfg, policy, min_margin=0.0: data_sources.source_records(  # noqa: E731
        cfg,
        str(sources["uf"]),
        "ultrafeedback",
        policy=policy,
        aspect_weights="",
        min_margin=min_margin,
        on_error="raise",
    )
    records, summary = read(kto, "all_pairs")
    assert len(records) == 40 and all(isinstance(r, UnpairedExample) for r in records)
    assert [r.desirable for r in records[:2]] == [True, False] and "KTO examples" in summary
    assert read(kto, "unpaired")[0] == records
    pairs, summary = read(validate(run_config("rm", **base)), "all_pairs", min_margin=3.0)
    assert all(isinstance(p, PreferencePair) and p.margin >= 3.0 for p in pairs) and len(pairs) == 20
    assert "'below_margin': 40" in summary


def test_helpsteer_aspect_weights_from_the_config(run_config, tmp_path):
    rows = [
        {
            "prompt": "w1",
            "response": "w2",
            "helpfulness": 4,
            "correctness": 4,
            "coherence": 4,
            "complexity": 1,
            "verbosity": 0,
        },
        {
            "prompt": "w1",
            "response": "w3 w3 w3",
            "helpfulness": 3,
            "correctness": 3,
            "coherence": 4,
            "complexity": 4,
            "verbosity": 4,
        },
    ]
    path = write_jsonl(tmp_path / "hs.jsonl", rows)
    cfg = validate(run_config("rm", **{"data.source": str(path), "data.format": "helpsteer"}))

    def chosen(weights):
        (pair,), _ = data_sources.source_records(
            cfg,
            str(path),
            "helpsteer",
            policy="best_vs_worst",
            aspect_weights=weights,
            min_margin=0.0,
            on_error="raise",
        )
        return pair.chosen[0].content, pair.margin

    assert chosen("") == ("w2", 1.0)  # helpfulness alone
    assert chosen("helpfulness=0,verbosity=1") == ("w3 w3 w3", 4.0)
    assert chosen("tulu25") == ("w3 w3 w3", pytest.approx(0.25))  # (3+3+4+4)/4 - (4+4+4+1)/4
    with pytest.raises(ConfigError, match="aspect_weights"):
        chosen("helpfulness=lots")


@pytest.mark.slow
def test_jaxrl_train_on_a_three_source_mixture(sources, tmp_path, capsys):
    from jaxrl import cli

    workdir = tmp_path / "run"
    args = ["train", "--config", "experiments/tiny_pipeline.py", "--workdir", str(workdir)]
    for key, value in {
        "stage": "rm",
        "data.source": "mixture",
        "data.mixture": mixture(sources, count=24),
        "data.tokenizer": str(sources["tokenizer"]),
        "data.num_train": 0,
        "data.num_eval": 8,
        "train.steps": 2,
        "train.batch_size": 8,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.tensorboard": "false",
        "train.progress": "false",
        "data.eval_prompts_per_domain": 0,
    }.items():
        args += ["--set", f"{key}={value}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "read hs3 (helpsteer3, " in out and "rows read 30 = used 20 + dropped 10 (tie: 10)" in out
    summary = json.loads((workdir / "final" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["data"][3] == "mixture of 64 records (trl: 24, hs3: 20, uf: 20)"
