"""The console's SQL rendering: highlighted by PostgreSQL's scanner, and always escaped."""

from __future__ import annotations

from wardgate.web import highlight_sql


def test_keywords_strings_numbers_and_comments() -> None:
    html = str(highlight_sql("delete from t where name = 'é' and id = 42 -- why"))
    assert html == ('<span class="kw">delete</span> <span class="kw">from</span> t <span class="kw">where</span> '
                    '<span class="kw">name</span> = <span class="str">&#39;é&#39;</span> <span class="kw">and</span> '
                    'id = <span class="num">42</span> <span class="cmt">-- why</span>')


def test_hostile_text_is_escaped() -> None:
    for sql in ("select '<script>alert(1)</script>'", "select 1 /* </pre><img src=x onerror=alert(1)> */",
                "selec '<b>unterminated", 'select "<i>" from t'):
        html = str(highlight_sql(sql))
        assert "<script" not in html and "<img" not in html and "<b>" not in html and "<i>" not in html, html
