"""The recording journal on a disk that fills up: a write that fails part way leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wardgate.recording.journal import Journal


@pytest.mark.parametrize("how", ["write", "write_parts"])
def test_a_write_that_fails_part_way_is_cut_off(tmp_path: Path, how: str) -> None:
    """Found by make soak: with the disk full mid-record, a torn record stayed in the journal file, in
    front of the records written once there was room again. A file size limit (RLIMIT_FSIZE, in a child
    process) makes the kernel write part of a record and then refuse the rest."""
    script = textwrap.dedent(f"""
        import errno, resource
        from pathlib import Path
        from wardgate.recording.journal import Journal

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
