"""The first load's passes split over processes give the serial results: the same line
numbers, the same first bad line, the same fingerprint (stores built before stay valid)."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from datablame.data import parallel_load
from datablame.data.parallel_load import LineNumbers, check_jsonl
from datablame.errors import UserError


def _messy_jsonl(path, rows: int, seed: int = 0) -> list[int]:
    """Rows with blank lines (leading, doubled, CRLF, whitespace-only) and no final
    newline; returns each row's 1-based line, counted by hand."""
    rng = random.Random(seed)
    lines, where = ["", "  "], []
    for i in range(rows):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            lines.append(rng.choice(["", " \t", "\r"]))
        lines.append(json.dumps({"instruction": f"row {i}", "output": "é" * (i % 7)},
                                ensure_ascii=False) + rng.choice(["", "\r"]))
        where.append(len(lines))
    path.write_bytes("\n".join(lines).encode())
    return where


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_line_numbers_of_every_piece_count_equal_a_count_by_hand(tmp_path, workers):
    path = tmp_path / "t.jsonl"
    want = _messy_jsonl(path, 300)
    got = check_jsonl(path, workers=workers)
    assert len(got) == len(want) and list(got) == want
    assert got[-1] == want[-1] and got[5:9] == want[5:9]
    again = LineNumbers.from_array(got.to_array())
    assert list(again) == want


def test_line_numbers_without_blank_lines_hold_no_array_per_row():
    numbers = LineNumbers(10**9, np.zeros(0, dtype=np.int64))
    assert numbers[0] == 1 and numbers[10**9 - 1] == 10**9
    assert numbers.to_array().nbytes == 8
    with pytest.raises(IndexError):
        numbers[10**9]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_first_bad_line_is_named_whatever_the_pieces(tmp_path, workers):
    """Two bad lines, the second in a later piece: every split names the first."""
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"a": i}) for i in range(400)]
    lines[150] = "{not json"
    lines[390] = "[1, 2]"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl: line 151 is not valid JSON"):
        check_jsonl(path, workers=workers)
    lines[150] = json.dumps({"a": 150})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl: line 391 is not a JSON object"):
        check_jsonl(path, workers=workers)
    path.write_bytes(b'{"a": 1}\n' * 300 + b'{"a": "\xff"}\n')
    with pytest.raises(UserError, match=r"not UTF-8 text"):
        check_jsonl(path, workers=workers)


def test_the_fingerprint_hashed_by_processes_is_the_serial_one(tmp_path, monkeypatch):
    """Blocks serialized by two processes, hashed here in order: the very sha256 of every
    row's JSON line that indexes and stores record (written out here by hand)."""
    from datablame.data.rows import load_rows

    path = tmp_path / "t.jsonl"
    _messy_jsonl(path, 1000, seed=1)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("DATABLAME_LOAD_WORKERS", "2")
    monkeypatch.setattr(parallel_load, "FINGERPRINT_BLOCK", 128)  # 8 blocks
    spawned = []
    real_pool = parallel_load._pool
    monkeypatch.setattr(parallel_load, "_pool",
                        lambda n, *a: spawned.append(n) or real_pool(n, *a))
    rows = load_rows(path)
    by_hand = hashlib.sha256()
    for rec in rows.records:
        by_hand.update(json.dumps(rec, sort_keys=True, default=str,
                                  ensure_ascii=False).encode() + b"\n")
    assert rows.fingerprint() == "sha256:" + by_hand.hexdigest()
    assert spawned == [2, 2]  # the line check and the fingerprint each used two
    assert rows.line_numbers[0] == 3  # the file opens with two blank lines


@pytest.mark.parametrize("workers", [1, 3, 5])
def test_a_folders_files_are_checked_in_one_pool_each_counted_alone(tmp_path, workers):
    """Fewer files than workers: each is cut into pieces; lines count per file, and the
    first file with a bad line is the one named."""
    from datablame.data.parallel_load import check_jsonl_files

    paths = [tmp_path / f"train-{i}.jsonl" for i in range(2)]
    want = [_messy_jsonl(p, 200 + 50 * i, seed=i) for i, p in enumerate(paths)]
    assert [list(n) for n in check_jsonl_files(paths, workers)] == want
    data = paths[1].read_bytes()  # its last line is its last row (no final newline)
    paths[1].write_bytes(data + b"\n{broken\n")
    bad_line = data.count(b"\n") + 2
    with pytest.raises(UserError, match=rf"train-1.jsonl: line {bad_line} is not valid JSON"):
        check_jsonl_files(paths, workers)
