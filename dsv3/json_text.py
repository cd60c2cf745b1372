"""Parsing a JSON line read from a UTF-8 file, refusing strings that are not text.

A UTF-8 file cannot hold a lone UTF-16 surrogate, but JSON can spell one as an escape
(``"\\ud800"``), and ``json.loads`` returns it inside a str that no UTF-8 codec, file
write or tokenizer accepts: the data pipeline failed far downstream (hashing a
document) with no file or line named, and the evaluation's tokenizer with a type
error. The readers use ``loads`` to refuse such a line where it is read."""
import json


class LoneSurrogateError(ValueError):
    """A JSON string escape that is half of a UTF-16 pair, without its other half."""


def loads(line: str):
    """``json.loads(line)``; raises LoneSurrogateError where a string in it holds a lone
    surrogate (an escaped pair, "\\ud83d\\ude00", is one character and passes)."""
    value = json.loads(line)
    # Only an escape can put a surrogate in a line decoded from UTF-8: most lines skip
    # the second pass.
    if "\\ud" in line or "\\uD" in line:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise LoneSurrogateError(f"a lone surrogate escape (\\u{ord(e.object[e.start]):04x}) "
                                     "is not text") from None
    return value
