"""HelpSteer's responses of one prompt kept together: one rated list per prompt (rows of a prompt anywhere in
the file), scored as its pairs are, whole for listwise losses, binarised into the same pairs as before, with
every row and list counted and a malformed row located by file, row and field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl import config as config_lib
from jaxrl.data import sources as data_sources
from jaxrl.data.binarize import binarize, parse_aspects, to_lists
from jaxrl.data.readers import read
from jaxrl.data.records import Message, PreferencePair, RecordError

ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
MULTI_TURN = "What is 2+2?\n<extra_id_1>Assistant\n4.\n<extra_id_1>User\nAnd times 3?"


def row(prompt, response, *scores):
    """A row in nvidia/HelpSteer's schema (HelpSteer2's is the same): attributes are 0-4 integers."""
    return {"prompt": prompt, "response": response, **dict(zip(ASPECTS, scores, strict=True))}


# Three prompts with 4, 3 and 2 responses, interleaved: rows of one prompt are not adjacent.
ROWS = [
    row("Name a colour.", "Red.", 3, 3, 4, 1, 1),
    row(MULTI_TURN, "12.", 4, 4, 4, 1, 0),
    row("Name a colour.", "Blue, the colour of the sky.", 4, 4, 4, 2, 2),
    row("Write a haiku.", "Old pond / frog jumps in / splash.", 2, 3, 4, 2, 1),
    row(MULTI_TURN, "It is 12, since 4 x 3 = 12.", 4, 4, 4, 2, 2),
    row("Name a colour.", "Seven.", 0, 0, 2, 0, 0),
    row("Write a haiku.", "A haiku has 17 syllables.", 1, 2, 4, 1, 1),
    row("Name a colour.", "Green, or any of many others, such as teal.", 3, 4, 4, 2, 3),
    row(MULTI_TURN, "Nine.", 1, 0, 3, 0, 0),
]
COLOUR = ["Red.", "Blue, the colour of the sky.", "Seven.", "Green, or any of many others, such as teal."]
ARITHMETIC = ["12.", "It is 12, since 4 x 3 = 12.", "Nine."]
HAIKU = ["Old pond / frog jumps in / splash.", "A haiku has 17 syllables."]


def write(tmp_path: Path, rows, layout: str) -> Path:
    if layout == "jsonl":
        path = tmp_path / "helpsteer.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path = tmp_path / "train-00000-of-00001.parquet"
        schema = pa.schema(
            [("prompt", pa.string()), ("response", pa.string())] + [(a, pa.int64()) for a in ASPECTS]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def texts(messages):
    return [m.content for m in messages]


@pytest.mark.parametrize("layout", ["jsonl", "parquet"])
def test_a_prompts_rows_make_one_whole_list_scored_as_its_pairs_are(tmp_path, layout):
    result = read(write(tmp_path, ROWS, layout), "helpsteer")
    assert result.summary() == "rows read 9 = used 9 + dropped 0; 9 rows grouped into 3 records"
    colour, arithmetic, haiku = result.records  # prompts in order of first appearance
    assert colour.prompt == (Message("user", "Name a colour."),)
    assert arithmetic.prompt == (
        Message("user", "What is 2+2?"),
        Message("assistant", "4."),
        Message("user", "And times 3?"),
    )
    assert [texts(c)[0] for c in colour.completions] == COLOUR  # the prompt's rows in file order
    assert [texts(c)[0] for c in arithmetic.completions] == ARITHMETIC
    assert [texts(c)[0] for c in haiku.completions] == HAIKU
    assert colour.ratings[1] == dict(zip(ASPECTS, (4.0, 4.0, 4.0, 2.0, 2.0), strict=True))

    # Whole lists, scored as HelpSteer's pairs are: helpfulness alone by default, or the configured weights.
    lists, counts = to_lists(result.records, 4, aspect_reduce=parse_aspects("", "helpsteer"))
    assert counts == {}
    assert [(record.prompt, scored) for record, scored in lists] == [
        (colour.prompt, [(0, 3.0), (1, 4.0), (2, 0.0), (3, 3.0)]),
        (arithmetic.prompt, [(0, 4.0), (1, 4.0), (2, 1.0)]),
        (haiku.prompt, [(0, 2.0), (1, 1.0)]),
    ]
    tulu, _ = to_lists(result.records, 4, aspect_reduce=parse_aspects("tulu25", "helpsteer"))
    assert [score for _, score in tulu[0][1]] == pytest.approx(
        [2.75, 3.5, 0.5, 3.25]
    )  # mean without verbosity
    cut, counts = to_lists(result.records, 2, aspect_reduce=parse_aspects("", "helpsteer"))
    assert counts == {"cut_to_k": 2}  # 4 and 3 responses cut to 2, each keeping its best
    assert [len(scored) for _, scored in cut] == [2, 2, 2] and (1, 4.0) in cut[0][1]


def list_pairs(lists, policy):
    """The pairs of whole lists: every untied pair (all_pairs) or the best against the worst, higher first."""
    out = []
    for record, scored in lists:
        if policy == "best_vs_worst":
            best = max(scored, key=lambda item: item[1])
            worst = min((item for item in scored if item is not best), key=lambda item: item[1])
            candidates = [(best, worst)]
        else:
            candidates = [
                (a, b) if a[1] >= b[1] else (b, a) for n, a in enumerate(scored) for b in scored[n + 1 :]
            ]
        for (i, high), (j, low) in candidates:
            if high > low:
                completions = record.completions
                out.append(
                    PreferencePair(record.prompt, completions[i], completions[j], high - low, "helpsteer")
                )
    return out


@pytest.mark.parametrize("policy", ["all_pairs", "best_vs_worst"])
@pytest.mark.parametrize("aspects", ["", "helpsteer2"])
def test_the_lists_pairs_are_the_pairwise_readers_pairs(tmp_path, policy, aspects):
    records = read(write(tmp_path, ROWS, "jsonl"), "helpsteer").records
    aspect_reduce = parse_aspects(aspects, "helpsteer")
    pairs, dropped = binarize(records, policy, aspect_reduce=aspect_reduce)
    lists, _ = to_lists(records, 4, aspect_reduce=aspect_reduce)
    assert pairs == list_pairs(lists, policy)
    if policy == "all_pairs" and not aspects:  # 6 + 3 + 1 candidates, two of them ties
        assert len(pairs) == 8 and dropped == {"tie": 2}
        first = pairs[0]
        assert (texts(first.chosen), texts(first.rejected), first.margin) == (
            ["Blue, the colour of the sky."],
            ["Red."],
            1.0,
        )


def test_lists_read_equal_lists_used_plus_dropped_in_the_source_report(tmp_path, run_config):
    rows = ROWS[:4] + [row("A lone prompt.", "Its only response.", 3, 3, 3, 3, 3)] + ROWS[4:]
    rows.insert(
        2, {k: v for k, v in row("Name a colour.", "Purple.", 2, 2, 2, 2, 2).items() if k != "verbosity"}
    )
    path = write(tmp_path, rows, "jsonl")
    cfg = config_lib.override(
        run_config("dpo"), {"loss.name": "pl_dpo", "data.list_size": 4, "data.source": str(path)}
    )
    lists, summary = data_sources.source_records(
        cfg,
        str(path),
        "helpsteer",
        policy="best_vs_random",
        aspect_weights="",
        min_margin=0.0,
        on_error="skip",
    )
    # 11 rows, 1 malformed: 10 rows make 4 lists = 3 kept + 1 too short (a prompt with one response).
    assert summary == (
        "rows read 11 = used 10 + dropped 1 (missing_field: 1); 10 rows grouped into 4 records; "
        "kept as 3 ranked lists of up to 4 (0 cut to 4), dropped {'too_few_rated': 1}"
    )
    assert [len(scored) for _, scored in lists] == [4, 3, 2]
    pairs, summary = data_sources.source_records(
        config_lib.override(cfg, {"loss.name": "dpo", "data.list_size": 0}),
        str(path),
        "helpsteer",
        policy="all_pairs",
        aspect_weights="",
        min_margin=0.0,
        on_error="skip",
    )
    assert len(pairs) == 8 and summary.endswith(
        "binarised (all_pairs) to 8 pairs, dropped {'tie': 2, 'too_few_rated': 1}"
    )


@pytest.mark.parametrize(
    "change,reason,field",
    [
        ({"helpfulness": "very"}, "wrong_type", "helpfulness"),
        ({"response": ""}, "empty_response", "response"),
        ({"prompt": None}, "missing_field", "prompt"),  # a null, as Parquet writes a missing value
    ],
)
def test_a_malformed_row_names_file_row_and_field(tmp_path, change, reason, field):
    rows = [dict(r) for r in ROWS]
    rows[4].update(change)
    path = write(tmp_path, rows, "jsonl")
    with pytest.raises(RecordError) as info:
        read(path, "helpsteer")
    err = info.value
    assert (err.reason, err.file, err.row, err.field) == (reason, str(path), 4, field)
    assert f"file {path}, row 4, field {field!r}" in str(err)
    skipped = read(path, "helpsteer", on_error="skip")
    assert (
        skipped.summary() == f"rows read 9 = used 8 + dropped 1 ({reason}: 1); 8 rows grouped into 3 records"
    )
    assert [len(record.completions) for record in skipped.records] == [4, 2, 2]
