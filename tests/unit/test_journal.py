"""The recording journal: a write that fails part way (a disk that fills up) leaves nothing behind, and
records written to a file of their own are read back in their place."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wardgate.recording.journal import ATTACHED_SUFFIX, Journal, encode, read_records, remove


@pytest.mark.parametrize("how", ["write", "write_parts"])
def test_a_write_that_fails_part_way_is_cut_off(tmp_path: Path, how: str) -> None:
    """Found by make soak: with the disk full mid-record, a torn record stayed in the journal file, in
    front of the records written once there was room again. A file size limit (RLIMIT_FSIZE, in a child
    process) makes the kernel write part of a record and then refuse the rest."""
    script = textwrap.dedent(f"""
        import errno, resource
        from pathlib import Path
        from wardgate.recording.journal import ATTACHED_SUFFIX, Journal, encode, read_records, remove

        journal = Journal(Path({str(tmp_path)!r}))
        journal.write(b'{{"n": 1}}\\n')
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (journal.size + 5, hard))  # room for five bytes more
        try:
            if {how!r} == "write":
                journal.write(b'{{"n": 2, "padding": "xxxxxxxxxxxxxxxxxxxxxxxx"}}\\n')
            else:  # a long statement's record, written in its parts
                journal.write_parts([b'{{"n": 2, ', b'"padding": "xxxxxxxxxxxx', b'xxxxxxxxxxxx"}}', b'\\n'])
            raise SystemExit("the write should have failed")
        except OSError as exc:
            assert exc.errno == errno.EFBIG, exc
        assert journal.path.stat().st_size == journal.size  # the five bytes written are cut off again
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
        journal.write(b'{{"n": 3}}\\n')
        print(journal.path.read_text(), end="")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == '{"n": 1}\n{"n": 3}\n'


def test_parts_are_written_in_order_as_one_record(tmp_path: Path) -> None:
    """More parts than one writev takes (1,024), empty ones among them."""
    journal = Journal(tmp_path)
    parts = [b'{"text": "'] + [b"%d," % i if i % 7 else b"" for i in range(3000)] + [b'"}\n']
    journal.write_parts(parts)
    journal.write(b'{"n": 2}\n')
    assert journal.path.read_bytes() == b"".join(parts) + b'{"n": 2}\n'
    assert journal.size == journal.path.stat().st_size


def test_attached_records_are_read_in_their_place_and_removed_with_the_file(tmp_path: Path) -> None:
    """A record of many megabytes is written to a file of its own, outside the journal's lock; the journal
    refers to it where the record belongs, and reading the journal gives the records in order."""
    journal = Journal(tmp_path)
    journal.write(encode([{"n": 1}]).encode())
    name = journal.attach([b'{"n": 2, "text": "', b"x" * 100_000, b'"}\n', encode([{"n": 3}]).encode()])
    journal.write(encode([{"k": "attached", "file": name}, {"n": 4}]).encode())
    path = journal.path
    attached: list[Path] = []
    records = read_records(path, attached)
    assert [r["n"] for r in records] == [1, 2, 3, 4] and len(records[1]["text"]) == 100_000
    assert attached == [tmp_path / name]
    remove(path, attached)
    assert not path.exists() and not (tmp_path / name).exists()


def test_an_attached_file_is_never_read_from_outside_the_journal(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / f"x{ATTACHED_SUFFIX}").write_text('{"n": 99}\n')
    journal = Journal(tmp_path / "journal")
    journal.write(encode([{"n": 1}, {"k": "attached", "file": f"../elsewhere/x{ATTACHED_SUFFIX}"},
                          {"k": "attached", "file": "gone.part"}, {"n": 2}]).encode())
    assert [r["n"] for r in read_records(journal.path)] == [1, 2]


def test_attached_files_no_record_refers_to_are_removed_with_their_instance(tmp_path: Path) -> None:
    ended = Journal(tmp_path)
    orphan = ended.attach([encode([{"n": 1}]).encode()])  # the process ended before it referred to it
    live = Journal(tmp_path)
    kept = live.attach([encode([{"n": 2}]).encode()])
    live.forget_attached(ended.instance)
    assert not (tmp_path / orphan).exists() and (tmp_path / kept).exists()
