"""dsv3.eval.report's markdown table: a ``|`` inside a name (a perplexity domain, an mc
file, a bias term) is escaped, so a markdown reader still sees five cells per row
with the name whole in its own."""
import pytest

from dsv3.eval.report import markdown_table


def test_a_pipe_in_a_name_stays_inside_its_cell():
    results = {"tasks": {
        "ppl": {"en|news": {"perplexity": 2.0, "bits_per_byte": 0.5, "tokens": 4, "bytes": 9}},
        "bias": {"per_term": {"a|b": 0.0, "c": -1.0}, "gap": 1.0, "max_term": "a|b",
                 "min_term": "c", "templates": 1}}}
    table = markdown_table(results)
    assert "| ppl | perplexity [en\\|news] (n: tokens) | 2 |  | 4 |" in table
    assert "| bias | gap (a\\|b - c) | 1 |  | 1 |" in table
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(table)
    rows, row = [], None
    for token in tokens:
        if token.type == "tr_open":
            row = []
        elif token.type == "inline":
            row.append(token.content.replace("\\|", "|"))
        elif token.type == "tr_close":
            rows.append(row)
    assert all(len(r) == 5 for r in rows)
    assert ["ppl", "perplexity [en|news] (n: tokens)", "2", "", "4"] in rows
    assert ["bias", "score [a|b]", "0", "", "1"] in rows


def test_a_line_break_in_a_name_stays_inside_its_row():
    """A newline in a name (an mc file's task name, a bias term) ended the row there:
    the rest of the row, and every row after it, fell out of the table."""
    results = {"tasks": {
        "ppl": {"two\nlines": {"perplexity": 2.0, "bits_per_byte": 0.5, "tokens": 4, "bytes": 9},
                "crlf\r\nname": {"perplexity": 3.0, "bits_per_byte": 0.5, "tokens": 5,
                                 "bytes": 9}}}}
    table = markdown_table(results)
    assert "| ppl | perplexity [two<br>lines] (n: tokens) | 2 |  | 4 |" in table
    assert "| ppl | perplexity [crlf<br>name] (n: tokens) | 3 |  | 5 |" in table
    assert len(table.splitlines()) == 2 + 2 * 2  # header, rule; two metrics per domain
