"""The TFDS path: canonical records <-> JSON, prepare() a local source into a versioned array_record dataset
(no TensorFlow), read it back through readers.read(..., "tfds") and grain, the `jaxrl prepare` command, and a
tiny DPO run on a prepared dataset."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import sys

import grain
import pytest
from chat_fixtures import word_tokenizer
from test_readers import CASES, TULU_ROWS, UFB_ROWS, msg, write_jsonl, write_saved_dataset

from jaxrl import cli
from jaxrl.data import readers, tfds_builder
from jaxrl.data.records import (
    Conversation,
    PreferencePair,
    PromptRecord,
    RatedCompletions,
    RecordError,
    UnpairedExample,
    messages,
)

# Records <-> JSON.

MULTI_TURN = messages(
    ("system", "Tu es un assistant serviable. 🤖"),
    ("user", "Écris un haïku sur Kyoto 京都"),
    ("assistant", "Temples dans la brume"),
    ("user", "Encore\nun ?"),
)
RECORDS = [
    PreferencePair(MULTI_TURN, messages(("assistant", "Mousse, pluie.")), messages(("assistant", "Non."))),
    PreferencePair(
        messages(("user", "2+2?")),
        messages(("assistant", "4"), ("user", "sure?"), ("assistant", "yes")),
        messages(("assistant", "5")),
        margin=-0.1,
        source="s",
        id="7",
    ),
    RatedCompletions(MULTI_TURN, (messages(("assistant", "a")), messages(("assistant", "b"))), (1.5, -2.0)),
    RatedCompletions(
        messages(("user", "q")),
        (messages(("assistant", "a")),),
        ({"helpfulness": 4.0, "honesty": 0.1 + 0.2, "ünïcode": 1e-300},),
        source="uf",
    ),
    UnpairedExample(messages(("user", "¿Capital?")), messages(("assistant", "París 🇫🇷")), True),
    UnpairedExample(messages(("user", "q")), messages(("assistant", "bad")), False, source="kto", id="x"),
    PromptRecord(MULTI_TURN),
    PromptRecord(messages(("user", "1+1?")), ground_truth="2", source="gsm8k", id="17"),
    PromptRecord(messages(("user", "empty truth")), ground_truth=""),
    Conversation(MULTI_TURN + messages(("assistant", "犬 (inu)"))),
]
READER_RECORDS = [record for name in sorted(CASES) for record in CASES[name][1]]  # every reader's records


@pytest.mark.parametrize("record", RECORDS + READER_RECORDS)
def test_record_json_round_trip(record):
    text = tfds_builder.record_to_json(record)
    back = tfds_builder.record_from_json(text)
    assert back == record and type(back) is type(record)
    assert json.loads(text)["type"] == type(record).__name__
    assert tfds_builder.record_from_json(text.encode("utf-8")) == record  # TFDS hands back bytes


def test_record_json_keeps_none_and_is_plain_json():
    data = json.loads(tfds_builder.record_to_json(RECORDS[0]))
    assert data["margin"] is None and data["prompt"][0] == {
        "role": "system",
        "content": MULTI_TURN[0].content,
    }
    assert json.loads(tfds_builder.record_to_json(RECORDS[6]))["ground_truth"] is None
    with pytest.raises(ValueError):
        tfds_builder.record_to_json(
            PreferencePair(MULTI_TURN, RECORDS[0].chosen, RECORDS[0].rejected, float("nan"))
        )


GOOD = json.loads(tfds_builder.record_to_json(RECORDS[1]))


def changed(**fields):
    return json.dumps({**GOOD, **fields})


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"type": "PreferencePair", ', "invalid_json"),
        (b'{"type": "\xff"}', "invalid_utf8"),
        ("[1, 2]", "bad_structure"),
        (changed(type="Nope"), "bad_structure"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "chosen"}), "bad_structure"),
        (changed(extra=1), "bad_structure"),
        (changed(margin="1.0"), "bad_structure"),
        (changed(chosen=[{"role": "bot", "content": "4"}]), "unknown_role"),
        (changed(chosen=[{"role": "assistant", "content": 4}]), "bad_structure"),
        (changed(chosen="4"), "bad_structure"),
        (
            json.dumps({"type": "UnpairedExample", "prompt": [], "completion": [], "desirable": 1}),
            "bad_structure",
        ),
        (
            json.dumps(
                {"type": "RatedCompletions", "prompt": [], "completions": [], "ratings": [{"a": "5"}]}
            ),
            "bad_structure",
        ),
    ],
)
def test_record_from_json_rejects_malformed(text, reason):
    with pytest.raises(RecordError) as info:
        tfds_builder.record_from_json(text)
    assert (info.value.reason, info.value.field) == (reason, "record")


# prepare() and reading back.


def tulu_rows(n: int) -> list[dict]:
    """TULU_ROWS (unicode, multi-turn, system) and n more distinct rows in the tulu25 schema."""
    extra = [
        {
            "chosen": [msg("user", f"question {i}?"), msg("assistant", f"good answer {i}")],
            "rejected": [msg("user", f"question {i}?"), msg("assistant", f"bad answer {i}")],
            "source": "generated",
            "id": f"g{i}",
        }
        for i in range(n)
    ]
    return TULU_ROWS + extra


@pytest.fixture
def tulu_source(tmp_path):
    return write_jsonl(tmp_path / "tulu.jsonl", tulu_rows(38))


def quiet(_):
    pass


def test_prepare_reads_back_the_same_records_in_order(tmp_path, tulu_source):
    expected = readers.read(tulu_source, "tulu25")
    directory = tfds_builder.prepare(tulu_source, "tulu25", tmp_path / "data", name="tulu_small", log=quiet)
    assert directory == tmp_path / "data" / "tulu_small" / "1.0.0"
    assert any(p.name.startswith("tulu_small-train.array_record") for p in directory.iterdir())
    result = readers.read(directory, "tfds")
    assert result.records == expected.records and len(result.records) == 40  # order too: TFDS did not shuffle
    assert (result.rows_read, result.rows_used, result.dropped) == (40, 40, collections.Counter())
    assert list(tfds_builder.iter_records(directory)) == expected.records
    meta = tfds_builder.metadata(directory)
    assert meta["source_sha256"] == hashlib.sha256(tulu_source.read_bytes()).hexdigest()
    assert (meta["source"], meta["format"], meta["rows_read"], meta["rows_used"], meta["dropped"]) == (
        str(tulu_source),
        "tulu25",
        40,
        40,
        {},
    )
    info = json.loads((directory / "dataset_info.json").read_text())
    assert str(tulu_source) in info["description"] and expected.summary() in info["description"]


def test_data_source_is_random_access_for_grain(tmp_path, tulu_source):
    expected = readers.read(tulu_source, "tulu25").records
    directory = tfds_builder.prepare(tulu_source, "tulu25", tmp_path / "data", name="tulu_small", log=quiet)
    source = tfds_builder.data_source(directory)
    assert len(source) == len(expected)
    dataset = grain.MapDataset.source(source)
    for i in (39, 0, 17, 1):
        assert tfds_builder.decode_example(dataset[i]) == expected[i]
        assert int(dataset[i]["index"]) == i and dataset[i]["kind"] == b"PreferencePair"
    decoded = dataset.map(tfds_builder.decode_example)
    assert [decoded[i] for i in range(len(decoded))] == expected


def test_prepare_again_reuses_and_a_changed_source_needs_a_new_version(tmp_path, tulu_source):
    data_dir = tmp_path / "data"
    directory = tfds_builder.prepare(tulu_source, "tulu25", data_dir, name="tulu_small", log=quiet)
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    lines = []
    assert (
        tfds_builder.prepare(tulu_source, "tulu25", data_dir, name="tulu_small", log=lines.append)
        == directory
    )
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    assert "reusing" in lines[0]

    write_jsonl(tulu_source, tulu_rows(5))
    with pytest.raises(ValueError, match=r"1\.0\.0.*bump --version"):
        tfds_builder.prepare(tulu_source, "tulu25", data_dir, name="tulu_small", log=quiet)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    newer = tfds_builder.prepare(
        tulu_source, "tulu25", data_dir, name="tulu_small", version="1.0.1", log=quiet
    )
    assert newer == data_dir / "tulu_small" / "1.0.1"
    assert (
        len(readers.read(newer, "tfds").records) == 7 and len(readers.read(directory, "tfds").records) == 40
    )
    # Several names in one process: no TFDS registration conflicts.
    other = tfds_builder.prepare(tulu_source, "tulu25", data_dir, name="tulu_other", log=quiet)
    assert len(list(tfds_builder.iter_records(other))) == 7


def test_directory_source_hashes_every_file(tmp_path):
    saved = write_saved_dataset(tmp_path / "saved", UFB_ROWS * 3, shards=2)
    directory = tfds_builder.prepare(
        saved, "ultrafeedback_binarized", tmp_path / "data", name="ufb", log=quiet
    )
    assert readers.read(directory, "tfds").records == readers.read(saved, "ultrafeedback_binarized").records
    digest = tfds_builder.source_sha256(saved)
    assert tfds_builder.metadata(directory)["source_sha256"] == digest
    shard = sorted(saved.glob("*.arrow"))[1]
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert tfds_builder.source_sha256(saved) != digest
    with pytest.raises(ValueError, match="bump --version"):
        tfds_builder.prepare(saved, "ultrafeedback_binarized", tmp_path / "data", name="ufb", log=quiet)


@pytest.mark.parametrize("name", ["TuluSmall", "tulu-small", "1tulu", "tulu__small", "tulu_", ""])
def test_prepare_rejects_bad_names(tmp_path, tulu_source, name):
    with pytest.raises(ValueError, match="snake_case"):
        tfds_builder.prepare(tulu_source, "tulu25", tmp_path / "data", name=name, log=quiet)
    assert not (tmp_path / "data").exists()


def test_prepare_rejects_bad_versions_and_formats(tmp_path, tulu_source):
    with pytest.raises(ValueError, match=r"x\.y\.z"):
        tfds_builder.prepare(
            tulu_source, "tulu25", tmp_path / "data", name="ok_name", version="1.0", log=quiet
        )
    with pytest.raises(ValueError, match="unknown format 'tulu3'"):
        tfds_builder.prepare(tulu_source, "tulu3", tmp_path / "data", name="ok_name", log=quiet)
    assert not (tmp_path / "data").exists()


def test_skip_at_prepare_is_counted_in_the_stored_metadata(tmp_path):
    rows = tulu_rows(3)
    del rows[3]["rejected"]
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    with source.open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(RecordError, match="row 3") as info:
        tfds_builder.prepare(source, "tulu25", tmp_path / "data", name="bad", log=quiet)
    assert (info.value.reason, info.value.field) == ("missing_field", "rejected")
    assert not (tmp_path / "data" / "bad").exists()

    directory = tfds_builder.prepare(
        source, "tulu25", tmp_path / "data", name="bad", on_error="skip", log=quiet
    )
    meta = tfds_builder.metadata(directory)
    assert (meta["rows_read"], meta["rows_used"], meta["on_error"]) == (6, 4, "skip")
    assert meta["dropped"] == {"missing_field": 1, "invalid_json": 1}
    assert (
        "rows read 6 = used 4 + dropped 2 (invalid_json: 1, missing_field: 1)"
        in json.loads((directory / "dataset_info.json").read_text())["description"]
    )
    assert readers.read(directory, "tfds").records == readers.read(source, "tulu25", on_error="skip").records


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda text: text[:-1], "invalid_json"),  # a truncated row
        (lambda text: text.replace('"PreferencePair"', '"Preference"'), "bad_structure"),
    ],
)
def test_a_corrupted_stored_row_is_a_record_error_or_a_counted_skip(
    tmp_path, tulu_source, monkeypatch, tamper, reason
):
    expected = readers.read(tulu_source, "tulu25").records
    honest = tfds_builder.record_to_json
    corrupt = json.loads(honest(expected[2]))  # the stored JSON of row 2 is damaged on its way to the files
    monkeypatch.setattr(
        tfds_builder,
        "record_to_json",
        lambda r: tamper(honest(r)) if json.loads(honest(r)) == corrupt else honest(r),
    )
    directory = tfds_builder.prepare(tulu_source, "tulu25", tmp_path / "data", name="damaged", log=quiet)
    monkeypatch.undo()

    with pytest.raises(RecordError) as info:
        readers.read(directory, "tfds")
    err = info.value
    assert (err.reason, err.row, err.field, err.file) == (reason, 2, "record", str(directory))
    assert "row 2" in str(err) and "field 'record'" in str(err) and str(directory) in str(err)
    result = readers.read(directory, "tfds", on_error="skip")
    assert result.dropped == collections.Counter({reason: 1})
    assert (result.rows_read, result.rows_used) == (40, 39)
    assert result.records == expected[:2] + expected[3:]
    with pytest.raises(RecordError, match="row 2"):
        list(tfds_builder.iter_records(directory))


def test_the_tfds_reader_checks_kind(tmp_path):
    rows = [{"record": tfds_builder.record_to_json(RECORDS[0]), "kind": "Conversation"}]
    with pytest.raises(RecordError) as info:
        readers.read(write_jsonl(tmp_path / "r.jsonl", rows), "tfds")
    assert (info.value.reason, info.value.field, info.value.row) == ("bad_value", "kind", 0)


def test_wrong_directories_name_the_path_and_what_was_expected(tmp_path, tulu_source):
    directory = tfds_builder.prepare(tulu_source, "tulu25", tmp_path / "data", name="tulu_small", log=quiet)
    with pytest.raises(ValueError, match="features.json") as info:
        readers.read(directory.parent, "tfds")
    assert str(directory.parent) in str(info.value) and str(directory) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*features.json and dataset_info.json"):
        readers.read(tmp_path / "empty", "tfds")
    with pytest.raises(ValueError, match=r"empty.*not a prepared TFDS dataset"):
        tfds_builder.data_source(tmp_path / "empty")


def test_a_damaged_file_is_an_unreadable_file_error(tmp_path, tulu_source):
    directory = tfds_builder.prepare(tulu_source, "tulu25", tmp_path / "data", name="tulu_small", log=quiet)
    shard = next(directory.glob("tulu_small-train.array_record*"))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(RecordError, match=str(directory)) as info:
        readers.read(directory, "tfds", on_error="skip")
    assert info.value.reason == "unreadable_file" and info.value.row is None


def test_missing_tfds_says_how_to_install(tmp_path, tulu_source, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "jaxrl\[tfds\]"'):
        tfds_builder.prepare(tulu_source, "tulu25", tmp_path, name="x", log=quiet)
    args = [
        "prepare",
        "--source",
        str(tulu_source),
        "--format",
        "tulu25",
        "--out",
        str(tmp_path),
        "--name",
        "x",
    ]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.startswith("jaxrl prepare: error: the TFDS path needs")


# The command line and training.


def test_cli_prepare(tmp_path, tulu_source, capsys):
    out = tmp_path / "data"
    args = [
        "prepare",
        "--source",
        str(tulu_source),
        "--format",
        "tulu25",
        "--out",
        str(out),
        "--name",
        "tulu_cli",
    ]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout == [str(out / "tulu_cli" / "1.0.0"), "rows read 40 = used 40 + dropped 0"]
    assert readers.read(stdout[0], "tfds").records == readers.read(tulu_source, "tulu25").records

    assert cli.main(args) == 0  # reused
    assert capsys.readouterr().out.splitlines()[0] == stdout[0]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": [msg("user", "q"), msg("assistant", "a")]}])
    bad_args = ["prepare", "--source", str(bad), "--format", "tulu25", "--out", str(out), "--name", "bad"]
    assert cli.main(bad_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxrl prepare: error: ") and "row 0" in err and "'rejected'" in err
    assert cli.main(bad_args + ["--on-error", "skip"]) == 2  # nothing left to prepare
    assert "no records to prepare" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "prepare",
                "--source",
                str(tulu_source),
                "--format",
                "tulu25",
                "--out",
                str(out),
                "--name",
                "Bad-Name",
            ]
        )
        == 2
    )
    assert "snake_case" in capsys.readouterr().err
    write_jsonl(tulu_source, tulu_rows(1))
    assert cli.main(args) == 2
    assert "bump --version" in capsys.readouterr().err
    assert cli.main(args + ["--version", "1.1.0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(out / "tulu_cli" / "1.1.0"),
        "rows read 3 = used 3 + dropped 0",
    ]


WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture
def word_dataset(tmp_path):
    """A prepared tulu25 dataset of 48 word pairs, and a tokenizer for it."""
    rows = []
    for i in range(48):
        prompt = [msg("system", "w0"), msg("user", f"w{i % 40} w{(i * 7) % 40}")]
        rows.append(
            {
                "chosen": prompt + [msg("assistant", f"w{(i + 1) % 40} w1")],
                "rejected": prompt + [msg("assistant", f"w{(i + 2) % 40} w2 w3")],
                "id": str(i),
            }
        )
    source = write_jsonl(tmp_path / "words.jsonl", rows)
    directory = tfds_builder.prepare(source, "tulu25", tmp_path / "data", name="words", log=quiet)
    return directory, word_tokenizer(tmp_path / "tok", WORDS)


def dpo_config(run_config, directory, tokenizer, **overrides):
    return run_config(
        "dpo",
        **{
            "data.source": str(directory),
            "data.format": "tfds",
            "data.tokenizer": str(tokenizer),
            "data.num_train": 0,
            "data.num_eval": 16,
            **overrides,
        },
    )


def test_pipeline_tokenises_a_prepared_dataset(word_dataset, run_config):
    from jaxrl.data import pipeline
    from jaxrl.validate import validate

    cfg = validate(dpo_config(run_config, *word_dataset))
    data = pipeline.build_stage_data(cfg)
    assert data.report[0] == f"read {word_dataset[0]}: rows read 48 = used 48 + dropped 0"
    assert data.train["tokens"].shape[:2] == (32, 2) and data.eval["tokens"].shape[:2] == (16, 2)
    assert data.train["loss_mask"].sum() > 0


@pytest.mark.slow
def test_dpo_trains_on_a_prepared_dataset(word_dataset, run_config, tmp_path):
    from jaxrl import train

    cfg = dpo_config(run_config, *word_dataset, **{"train.steps": 4, "train.checkpoint_every": 4})
    lines = []
    summary = train.run(cfg, tmp_path / "run", log=lambda *a: lines.append(" ".join(map(str, a))))
    read_line = f"read {word_dataset[0]}: rows read 48 = used 48 + dropped 0"
    assert read_line in lines and summary["data"][0] == read_line
    assert summary["stage"] == "dpo" and summary["steps"] == 4
    assert summary["eval"]["examples"] == 16 and all(map(math.isfinite, summary["train"].values()))
