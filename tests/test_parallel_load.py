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
    with path.open("a") as fh:  # bytes no other run has loaded: nothing cached to reuse
        fh.write("\n" + json.dumps({"instruction": str(tmp_path), "output": "unique"}))
    monkeypatch.setenv("DATABLAME_LOAD_WORKERS", "2")
    monkeypatch.setattr(parallel_load, "BATCH_ROWS", 128)  # blocks of 128 rows: 8 of them
    monkeypatch.setattr(parallel_load, "BLOCK_BYTES", 1)
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


def test_lone_carriage_returns_end_lines_as_before(tmp_path):
    """A file of classic Mac line ends (and one mixed in): lines as text mode counts them,
    which is what `datasets` reads as rows."""
    from datablame.data.rows import load_rows

    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\r{"a": 2}\r\r{"a": 3}\r\n \r{"a": 4}\r')
    for workers in (1, 2):
        assert list(check_jsonl(path, workers=workers)) == [1, 2, 4, 6]
    assert [r["a"] for r in load_rows(path).records] == [1, 2, 3, 4]


def test_a_utf8_error_is_named_by_its_line_and_only_the_first_error_counts(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n' * 50 + b'{"a": "\xff"}\n' + b'{"a": 1}\n' * 50 + b"{x\n")
    for workers in (1, 3):
        with pytest.raises(UserError, match=r"t.jsonl: line 51 is not UTF-8 text"):
            check_jsonl(path, workers=workers)


def test_workers_that_cannot_start_are_replaced_by_this_process(tmp_path, monkeypatch):
    """A script without a main guard breaks a "spawn" pool (BrokenProcessPool): the pass
    is done here, with a note, and gives the same results."""
    from concurrent.futures.process import BrokenProcessPool

    path = tmp_path / "t.jsonl"
    want = _messy_jsonl(path, 400)

    class Broken:
        def __init__(self, *_a, **_k):
            pass

        def __enter__(self):
            raise BrokenProcessPool("a child process terminated abruptly")

        def __exit__(self, *_):
            return False

    monkeypatch.setattr(parallel_load, "_pool", Broken)
    monkeypatch.setattr(parallel_load, "BATCH_ROWS", 64)
    monkeypatch.setattr(parallel_load, "BLOCK_BYTES", 1)
    with pytest.warns(UserWarning) as said:
        assert list(check_jsonl(path, workers=3)) == want
        records = [{"row": i} for i in range(300)]
        together = b"".join(parallel_load.hashed_row_bytes(records, workers=2))
    assert together == b"".join(parallel_load.row_bytes(r) for r in records)
    said = " ".join(str(w.message) for w in said)
    assert "checking the JSON lines in worker processes failed (BrokenProcessPool)" in said
    assert "hashing the rows in worker processes failed" in said


def test_only_the_cli_splits_a_load_unless_asked(monkeypatch):
    """The Python API's caller may be a script without a main guard: no workers by
    default; the `datablame` command (and DATABLAME_LOAD_WORKERS) turn them on."""
    monkeypatch.delenv("DATABLAME_LOAD_WORKERS", raising=False)
    big = parallel_load.PARALLEL_FROM_ROWS
    monkeypatch.setattr(parallel_load, "_by_default", False)
    assert parallel_load.load_workers(10 * big, big) == 1
    monkeypatch.setattr(parallel_load, "_by_default", True)
    assert parallel_load.load_workers(10 * big, big) == min(16, parallel_load.usable_cpus())
    assert parallel_load.load_workers(big - 1, big) == 1
    monkeypatch.setenv("DATABLAME_LOAD_WORKERS", "3")
    assert parallel_load.load_workers(1, big) == 3
    monkeypatch.setenv("DATABLAME_LOAD_WORKERS", "many")
    with pytest.raises(UserError, match="DATABLAME_LOAD_WORKERS must be a whole number"):
        parallel_load.load_workers(1, big)


@pytest.mark.parametrize("guard", ["none", "whole", "after", "comment"])
def test_a_script_without_a_main_guard_is_not_run_again_by_workers(tmp_path, guard):
    """Spawned workers import the calling script: work outside `if __name__ ==
    "__main__":` would run again in each (the trial saw it three times; the review, with a
    guard further down or only in a comment). Such a script loads in its own process, with
    a warning at its own line; a load inside the guard gets its workers."""
    import os
    import subprocess
    import sys

    path = tmp_path / "t.jsonl"
    _messy_jsonl(path, 300)
    body = (f"import os\nfrom datablame.data.rows import load_rows\n"
            f"open({str(tmp_path / 'ran.log')!r}, 'a').write(str(os.getpid()) + '\\n')\n"
            f"print(load_rows({str(path)!r}).fingerprint())\n")
    script = tmp_path / "script.py"
    script.write_text({
        "none": body,
        "whole": "if __name__ == '__main__':\n" + "".join(
            "    " + line + "\n" for line in body.splitlines()),
        "after": body + "if __name__ == '__main__':\n    pass\n",
        "comment": "# TODO: if __name__ == '__main__':\n" + body}[guard])
    env = {**os.environ, "DATABLAME_LOAD_WORKERS": "2", "HF_DATASETS_CACHE":
           str(tmp_path / "hf"), "DATABLAME_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "ran.log").read_text().split()) == 1  # the body ran once
    assert done.stdout.strip().startswith("sha256:")
    warned = "runs this outside an `if __name__" in done.stderr
    assert warned == (guard != "whole"), done.stderr
    assert not warned or "script.py:" in done.stderr  # pointing at the script's line


def test_a_byte_order_mark_opening_the_file_is_not_a_bad_line(tmp_path):
    """Editors on Windows write one; `datasets` reads past it, so the check does too."""
    from datablame.data.rows import load_rows

    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f'{{"instruction": "{tmp_path}", "output": "b"}}\n'
                     .encode() + b'{"instruction": "c", "output": "d"}\n')
    assert list(check_jsonl(path, workers=2)) == [1, 2]
    assert [r["output"] for r in load_rows(path).records] == ["b", "d"]
    array = tmp_path / "rows.json"  # a JSON document (a list of rows) with one, too
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": str(tmp_path),
                                                      "output": "e"}]).encode())
    assert [r["output"] for r in load_rows(array).records] == ["e"]
    path.write_bytes(b'{"a": 1}\n\xef\xbb\xbf{"a": 2}\n')  # inside the file it is a bad line
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        check_jsonl(path)
