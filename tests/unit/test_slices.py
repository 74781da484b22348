"""Long statements read a slice at a time: the text made in place is the text a decode gives, whatever
the encoding, the characters and where the slices cut them."""

from __future__ import annotations

import asyncio
import random
import types

import pytest

from wardgate.engines.postgres import slices

ALPHABETS = {
    "ascii": "select 'abc\\\\def' from t where x = 1;\n",
    "latin1 range": "sélect 'àçé' ÿ",
    "two bytes a character": "select 'Ωλ€' ＡＢ",
    "four bytes a character": "select '😀𝄞' a",
    "all of them": "a é € 😀 \\\\",
}


@pytest.mark.parametrize("alphabet", ALPHABETS.values(), ids=ALPHABETS.keys())
@pytest.mark.parametrize("native", [True, False], ids=["C", "python"])
def test_a_statement_read_in_slices_is_the_text_a_decode_gives(monkeypatch, alphabet: str, native: bool) -> None:
    monkeypatch.setattr(slices, "SLICE", 7)  # slices that cut characters in the middle
    if not native:
        monkeypatch.setattr(slices, "blank_text", None)
    rng = random.Random(alphabet)
    for codec_name in ("utf-8", "gb18030"):
        for _ in range(30):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
            raw = text.encode(codec_name)
            got = asyncio.run(slices.read_statement(memoryview(raw), codec_name))
            assert got is not None
            made, ascii_only, backslash = got
            assert made == text and hash(made) == hash(text) and type(made) is str
            assert ascii_only == raw.isascii() and backslash == (b"\\" in raw)


def test_bytes_not_valid_in_the_encoding_are_refused() -> None:
    assert asyncio.run(slices.read_statement(memoryview(b"select '\xff\xfe'"), "utf-8")) is None


def test_a_blank_text_is_filled_only_within_it_and_with_what_fits() -> None:
    assert slices.blank_text is not None, "the C module (_wire) is built by make setup"
    t = slices.blank_text(3, 127)
    for bad in ("é", "abcd", b"\xff"):
        with pytest.raises(ValueError):
            slices.fill_text(t, 0, bad)
    with pytest.raises(ValueError):
        slices.fill_text(slices.blank_text(3, 0xFF), 0, "€")


def test_an_outbox_writes_what_is_long_a_slice_a_turn_and_in_order() -> None:
    """Over a real socket: 5 MiB and what is written after it arrive whole and in order; the long write is
    handed to the transport a slice at a time, one a turn of the loop, and the other side is told
    when it becomes busy and when it is idle again."""
    import socket

    async def run() -> tuple[bytes, int, list[bool]]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
        changes: list[bool] = []
        box = slices.Outbox(types.SimpleNamespace(transport=transport), lambda: changes.append(box.busy))
        long = bytes(range(256)) * (5 * 4096)
        box.write([long])
        given = transport.get_write_buffer_size()  # what the transport holds of it: one slice at most
        box.send(b"after")  # waits behind the long write
        b.setblocking(False)
        got = bytearray()
        while len(got) < len(long) + 5:
            got += await loop.sock_recv(b, 1 << 20)
        transport.close()
        b.close()
        return bytes(got), given, changes

    got, given, changes = asyncio.run(run())
    assert got == bytes(range(256)) * (5 * 4096) + b"after"
    assert given <= slices.SLICE and changes == [True, False]
