"""Sensitive-information detection and scrubbing: regex candidates, then validation.

Each kind has a permissive regex that finds candidates and a validator that rejects
look-alikes, which is where precision comes from: Chinese resident ID numbers must
carry a valid birth date and the GB 11643-1999 check character, bank cards must pass
Luhn and start like a card network, IBANs their ISO 13616 mod-97 check, US social
security numbers the SSA's ranges, IPs must parse, secrets must look random. A phone
number without a country code ("020 7946 0958") is one only right after a word that
says phone ("Tel:", "call me on", "电话", "電話"): by itself it is any number.

Matching runs on an NFKC-normalized copy (full-width digits, the full-width ＠, the
full-width full stop become ASCII), normalized character by
character so every match maps back to a span of the original text; ``find_pii``
returns spans of the text it was given.

Public: ``find_pii(text) -> list[PiiSpan]``, ``scrub(text, policy)`` and the
:class:`PiiFilter` step (replace with typed placeholders, or drop the document,
per kind; counts per kind).
"""
from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from datetime import date
from typing import Callable, Mapping

from dsv3.data.document import Document
from dsv3.data.step import Step

KINDS = ("email", "phone", "cn_id", "bank_card", "iban", "us_ssn", "ip", "url_credentials",
         "secret")
POLICIES = ("replace", "drop", "keep")
PLACEHOLDERS = {k: f"<{k.upper()}>" for k in KINDS}


@dataclass(frozen=True)
class PiiSpan:
    kind: str
    start: int
    end: int


# --- normalization with an offset map ---------------------------------------------------------
_NFKC_CACHE: dict[str, str] = {}


def _normalize(text: str) -> tuple[str, list[int] | None]:
    """NFKC per character, and for each normalized character the index of the original
    character it came from (None when nothing changed: the common ASCII case). A
    combining mark is composed into the character before it where one exists
    (decomposed "u" + U+0308 is "ü", a letter of the word around it); the composed
    character keeps the base's index, and the mark has none of its own."""
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text, None
    pieces, origin = [], []
    cache = _NFKC_CACHE
    for i, ch in enumerate(text):
        if ch < "\x80":
            pieces.append(ch)
            origin.append(i)
            continue
        if pieces and unicodedata.combining(ch):
            composed = unicodedata.normalize("NFC", pieces[-1][-1] + ch)
            if len(composed) == 1:
                pieces[-1] = pieces[-1][:-1] + composed
                continue
        norm = cache.get(ch)
        if norm is None:
            norm = unicodedata.normalize("NFKC", ch)
            if len(cache) < 100_000:
                cache[ch] = norm
        pieces.append(norm)
        origin.extend([i] * len(norm))
    return "".join(pieces), origin


# --- validators ---------------------------------------------------------------------------------
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def _id_date_ok(digits: str) -> bool:
    try:
        born = date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    except ValueError:
        return False
    return date(1900, 1, 1) <= born <= date.today()


def _id_shaped(digits: str) -> bool:
    """Region code and birth date of a resident ID, checksum not yet checked."""
    return len(digits) == 18 and digits[0] in "1234568" and _id_date_ok(digits)


def valid_cn_id(s: str) -> bool:
    """GB 11643-1999: 6-digit region, 8-digit birth date, 3-digit sequence, check char."""
    s = s.upper()
    if len(s) != 18 or not s[:17].isdigit() or not _id_shaped(s[:17] + "0"):
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_network_ok(d: str) -> bool:
    """Issuer prefix and length of the major networks (Visa, Mastercard, Amex,
    UnionPay, JCB, Discover, Diners): a random Luhn-passing number usually fails it."""
    n = len(d)
    if d[0] == "4":
        return n in (13, 16, 19)
    if d[:2] in ("34", "37"):
        return n == 15
    if "51" <= d[:2] <= "55" or "2221" <= d[:4] <= "2720":
        return n == 16
    if d[:2] == "62" or d[:2] == "81":
        return 16 <= n <= 19
    if "3528" <= d[:4] <= "3589" or d[:4] == "6011" or d[:2] == "65" or "644" <= d[:3] <= "649":
        return 16 <= n <= 19
    if d[:2] in ("36", "38", "39") or "300" <= d[:3] <= "305":
        return 14 <= n <= 19
    return False


def valid_bank_card(s: str) -> bool:
    d = re.sub(r"[ .-]", "", s)
    if not (13 <= len(d) <= 19 and d.isdigit()):
        return False
    # an 18-digit number with a region and birth date is a mistyped ID, not a card
    if len(d) == 18 and _id_shaped(d):
        return False
    return _card_network_ok(d) and luhn_ok(d)


def valid_iban(s: str) -> bool:
    """ISO 13616: a country code, two check digits and up to 30 letters or digits,
    whose letters as numbers (A=10 ... Z=35), the first four characters moved last,
    leave 1 modulo 97."""
    compact = s.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    digits = "".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


def valid_us_ssn(s: str) -> bool:
    """AAA-GG-SSSS as the SSA issues them: no area 000, 666 or 900-999, no group 00,
    no serial 0000."""
    area, group, serial = s.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _cn_mobile_ok(s: str) -> bool:
    """A Chinese mobile number, not an amount or an id of 11 digits that happens to
    start 13-19 ("15000000000 yuan"): its last eight digits are not six zeros or more
    at the end, nor one digit repeated."""
    subscriber = re.sub(r"\D", "", s)[-8:]
    return not subscriber.endswith("000000") and len(set(subscriber)) > 1


def _valid_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return s not in ("::", "0.0.0.0")


def _valid_ipv4(s: str) -> bool:
    """A parsable host address that is not a version or section number: those run
    "2.7.2.2", "8.2.4.44" (three single-digit parts first), which the stdlib's own
    text is full of, or end in ".0" ("3.12.1.0", a browser's "Chrome/120.0.0.0"),
    which as an address names a network, not anyone's host. Any other dotted number
    that parses is an address whatever words precede it ("version 10.2.3.4" too:
    privacy over false positives); only a pin, "pkg==10.2.3.4", is claimed before this
    runs (the "version" pattern). The public resolvers 1.1.1.1 / 8.8.8.8 are the cost,
    and they are no one's personal information."""
    parts = s.split(".")
    return _valid_ip(s) and not all(len(p) == 1 for p in parts[:3]) and parts[3] != "0"


def _valid_ipv6(s: str) -> bool:
    """A parsable address (zone included: fe80::1%eth0) shaped like the ones people
    write: a group of 3-4 hex digits (fe80::1, 2001:db8::1), and at least three groups
    when all are decimal (2001:4860:4860::8888). Python slices (x[::2], a[1::2],
    buf[1024::4]), "1:2:3:4:5:6:7:8" and "ab:cd::" are not; nor is the loopback ::1,
    which is no one's address (and is x[::1])."""
    address = s.split("%")[0]
    groups = [g for g in address.split(":") if g]
    # a lone group beside "::" is a slice of a named start ("a[dec::-1]", "x[abc::]")
    return (("::" in address or address.count(":") == 7) and _valid_ip(s)
            and len(groups) >= 2 and max(map(len, groups), default=0) >= 3
            and (len(groups) >= 3 or not all(g.isdigit() for g in groups)))


def _entropy_bits_per_char(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _looks_random(s: str) -> bool:
    """A secret value: long, high entropy, and either letters with digits or mixed-case
    letters that do not read as code or a placeholder: 'password=changeme',
    YOUR_API_KEY_HERE and HTTPPasswordMgr.find_user_password are not secrets."""
    if len(s) < 16 or _entropy_bits_per_char(s) < 3.0 or re.search(r"[A-Za-z]", s) is None:
        return False
    if re.search(r"\d", s):
        return True
    return (re.search(r"[a-z]", s) is not None and re.search(r"[A-Z]", s) is not None
            and "." not in s and "_" not in s)


_ADDRESS_WORDS = frozenset({"ip", "ipv4", "host", "hostname", "addr", "address", "server",
                            "peer", "gateway", "gw", "dns", "src", "dst", "remote", "proxy"})


def _is_version_pin(s: str) -> bool:
    """"name==1.2.3.4" where no part of the name (split at "_", "-", ".") names an
    address: "host_ip==10.2.3.4" is code comparing an address, "pkg==10.2.3.4" a pin."""
    name = re.split(r"[\[=~]", s, maxsplit=1)[0].lower()
    return _ADDRESS_WORDS.isdisjoint(re.split(r"[_.-]", name))


def _phone_ok(s: str) -> bool:
    """An international number has 9 to 15 digits with its country code (E.164 allows
    15; below 9 it is a year range or an amount, "+2024 2025", "+10 000 000", more
    often than one of the few territories with numbers that short), and a +1 number
    is North American: 10 digits after the 1, the area code starting with 2-9."""
    digits = re.sub(r"\D", "", s)
    if digits[0] == "1":  # +1 is the only country code that starts with 1
        return len(digits) == 11 and digits[1] not in "01"
    return 9 <= len(digits) <= 15


def _national_phone_ok(s: str) -> bool:
    """A number after a phone word: 7 digits (a local number) to 15 (E.164's most),
    and not two years ("Phone 2024 2025 models")."""
    digits = re.sub(r"\D", "", s)
    years = re.fullmatch(r"(?:19|20)\d\d\D+(?:19|20)\d\d", s)
    return 7 <= len(digits) <= 15 and years is None


# --- patterns: (kind, regex, group holding the value, validator) -------------------------------
# Compiled with re.ASCII: \w and \b then mean ASCII word characters, so a number or an
# address glued to Chinese text ("手机13812345678") is still found. Email is the
# exception (below).
_ND = r"(?<![\w.+])"      # not glued to a preceding word, number or sign
_NT = r"(?![\w@]|[.-]\d)"  # not continued by a word character or by more digits
# Email takes Unicode word characters (jörg.müller@münchen.de: RFC 6531 local parts,
# IDN domains) but not those of scripts written without spaces between words: CJK,
# and Thai, Lao, Tibetan, Myanmar (U+0E00-U+109F) and Khmer. Such text runs into an
# address ("请通过li.si@example.com联系我们", "ติดต่อjohn@example.comครับ"), and its
# letters there are the sentence.
_NO_SPACE_CHARS = (r"\u0e00-\u109f\u1780-\u17ff\u19e0-\u19ff"
                   r"\u2e80-\u9fff\ua000-\ua4cf\uac00-\ud7af\uf900-\ufaff\uff00-\uffef")
_EA = rf"[^\W_{_NO_SPACE_CHARS}]"         # a letter or digit of an address
_EW = rf"(?:[^\W{_NO_SPACE_CHARS}]|[%+-])"  # ... or "_", "%", "+", "-"
_UNICODE_KINDS = frozenset({"email"})
_RAW_PATTERNS: list[tuple[str, str, int, Callable[[str], bool]]] = [
    # a scheme of at most 32 characters: unbounded, every word start in a long run of
    # scheme characters ("a.a.a.a...") scanned to the end of the run (quadratic)
    ("url_credentials", (
        r"\b[a-zA-Z][a-zA-Z0-9+.-]{0,31}://([^\s/:@]+:[^\s/@]+)@[^\s/?#]+"), 1, lambda s: True),
    # the body cannot hold "-----", so a BEGIN without its END costs one scan to the
    # next marker, not one to the end of the text (quadratic over many BEGINs)
    ("secret", (
        r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----(?:[^-]|-(?!----))+"
        r"-----END (?:[A-Z]+ )?PRIVATE KEY-----"),
     0, lambda s: True),
    ("secret", (
        r"\b(AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|xox[baprs]-[A-Za-z0-9-]{10,}"
        r"|sk-(?:proj-)?[A-Za-z0-9_-]{20,}|sk_live_[0-9A-Za-z]{24,}|AIza[0-9A-Za-z_-]{35})\b"),
     1, lambda s: True),
    # a keyword anywhere in a snake/kebab-case name (aws_secret_access_key, DB_PASSWORD):
    # after a non-alphanumeric, with at most three more parts before the ":" or "="
    ("secret", (
        r"(?i)(?<![A-Za-z0-9])(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?(?:token|key)"
        r"|auth[_-]?token|password|passwd|client[_-]?secret)(?:[_-][A-Za-z0-9]{1,16}){0,3}"
        r"[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_\-/+=.]{16,})"),
     1, _looks_random),
    # a password's value may hold any printable character ("Xk9#mP2$vL8@qR4!nT6"),
    # up to a quote, a space or a closing bracket or separator
    ("secret", (
        r"(?i)(?<![A-Za-z0-9])(?:password|passwd|pwd)(?:[_-][A-Za-z0-9]{1,16}){0,3}"
        r"[\"']?\s*[:=]\s*[\"']?([^\s\"'`,;)\]}]{16,})"),
     1, _looks_random),
    ("email", (
        rf"(?<![.+-]|{_EW})(?:{_EA}(?:(?:{_EW}|\.){{0,62}}{_EW})?)"
        rf"@(?:{_EA}(?:(?:{_EA}|-){{0,61}}{_EA})?\.)+"
        rf"(?:[^\W\d_{_NO_SPACE_CHARS}]{{2,24}}|xn--[a-z0-9-]{{2,59}})(?!{_EW})"),
     0, lambda s: ".." not in s),
    ("cn_id", (_ND + r"([1-8]\d{16}[\dXx])" + _NT), 1, valid_cn_id),
    # 4-4-4-4(+), dotted too, and 4-6-5 / 4-6-4 as Amex and Diners print them
    ("bank_card", (
        _ND + r"(\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7}|\d{4}(?:\.\d{4}){3}|\d{4}[ -]?\d{6}[ -]?\d{4,5}"
        r"|\d{13,19})" + _NT),
     1, valid_bank_card),
    # IBAN: country, check digits, then the account in groups of four (or run together)
    ("iban", (r"(?<![A-Za-z0-9])([A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)"
              r"(?![A-Za-z0-9])"), 1, valid_iban),
    ("us_ssn", (_ND + r"(\d{3}-\d{2}-\d{4})" + _NT), 1, valid_us_ssn),
    # Chinese mobiles: 1[3-9]x, optionally +86 / 0086 / 86, optionally split 3-4-4
    ("phone", (
        _ND + r"((?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2})" + _NT), 1, _cn_mobile_ok),
    # international: a + and country code, "(+44)" too, then groups of digits
    ("phone", (
        _ND + r"((?:\+[1-9]\d{0,2}|\(\+[1-9]\d{0,2}\))[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}"
        r"(?:[ .-]?\d{2,4}){1,4})" + _NT),
     1, _phone_ok),
    # North American style without a country code: (555) 123-4567, 555-123-4567, and
    # with dots or spaces where the area code and exchange are valid (2-9 first)
    ("phone", (_ND + r"(\(\d{3}\) ?\d{3}-\d{4}|\d{3}-\d{3}-\d{4}"
               r"|[2-9]\d{2}([. ])[2-9]\d{2}\2\d{4})" + _NT),
     1, lambda s: True),
    # a version pin ("pkg==10.2.3.4", "pkg[extra]~=10.2.3.4", a requirements line)
    # claims its span before the ip rules see it; not reported. It is the only context
    # that hides a number that parses as an address: "if ip == 10.2.3.4", "!=", ">=",
    # "update 10.2.3.4" or "release: 10.2.3.4" may as well be an address, and privacy
    # wins over a false positive. The name must start a word and not name an address.
    ("version", (
        r"(?<![\w.-])[A-Za-z][\w.-]{0,99}(?:\[[\w,.-]{0,99}\])?(?:===?|~=)\d+(?:\.\d+){2,}"),
     0, _is_version_pin),
    ("ip", (r"(?<![\w.])((?:\d{1,3}\.){3}\d{1,3})(?![\w]|\.\d)"), 1, _valid_ipv4),
    ("ip", (
        # not inside a longer address, but a colon after a word ("ip:" or a full-width
        # "：" after Chinese, both ":" after NFKC) may precede one
        r"(?<![\w.])(?<![0-9A-Fa-f]:)((?:"
        r"(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,7}:"
        r"|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4}"
        r"|(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6})"
        r"(?:%[0-9A-Za-z_-]{1,16}(?:\.\d{1,4})?)?)"  # a zone: %eth0, %eth0.100 (a VLAN)
        r"(?![\w:%]|\.\d)"), 1, _valid_ipv6),
    # A national number (no country code: "020 7946 0958", "5551234567", "010-12345678")
    # is only a number by itself; right after a word that says phone ("Tel:", "call me
    # on", "联系电话：", not a bare "cell", a grid's as often) it is one. Last: what an
    # earlier kind took (an address, a card) stays that kind.
    # The word's first letter comes first, as a plain class: the search then skips to
    # those letters, where an alternation under (?i) was tried at every position
    # (half of this rule's time on the embedded corpus).
    # The Chinese words in Simplified and Traditional script (电话/電話, 手机/手機,
    # 传真/傳真; NFKC does not map one to the other, and Taiwan and Hong Kong text
    # uses the latter): a character class per character also takes text that mixes
    # them. "联系电话", "聯絡電話" end in the word and are found by it.
    ("phone", (
        r"(?:[TtPpMmCcFfWw](?<![A-Za-z][A-Za-z])(?i:(?<=t)el(?:ephone)?|(?<=p)hone"
        r"|(?<=m)obile|(?<=c)ellphone|(?<=c)ell(?=\s*:)|(?<=f)ax|(?<=w)hatsapp"
        r"|(?<=c)all (?:us|me) (?:at|on))(?![A-Za-z])|[电電][话話]|手[机機]|[传傳]真)"
        r"[^\d\n+]{0,12}?(?<![\w.])(\(?\d{2,5}\)?(?:[ .-]?\d{2,5}){1,5})" + _NT),
     1, _national_phone_ok),
]
_PATTERNS = [(kind, re.compile(p, 0 if kind in _UNICODE_KINDS else re.ASCII), group, ok)
             for kind, p, group, ok in _RAW_PATTERNS]
_NOT_REPORTED = frozenset({"version"})
# Cheap gates: a family whose trigger cannot occur in the text is not run at all.
_NEEDS_AT = frozenset({"email", "url_credentials"})
_NEEDS_DIGIT = frozenset({"cn_id", "bank_card", "iban", "us_ssn", "phone", "ip", "version"})


def _origin_end(origin: list[int], end: int, n: int) -> int:
    """Where a match ending before normalized character ``end`` ends in the original:
    past its last character's source, and past any marks composed into it (they run
    up to the next character's source)."""
    return max(origin[end - 1] + 1, origin[end] if end < len(origin) else n)


def find_pii(text: str) -> list[PiiSpan]:
    """Spans of sensitive information in ``text`` (indices into ``text`` itself),
    sorted by start; overlapping candidates resolve to the earlier listed kind."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    norm, origin = _normalize(text)
    has_at = "@" in norm
    has_digit = re.search(r"\d", norm) is not None
    # which characters a kind has claimed: checking a candidate costs its length, where
    # a list of claimed spans made a text with many hits quadratic
    taken = bytearray(len(norm))
    found: list[PiiSpan] = []
    for kind, pattern, group, ok in _PATTERNS:
        if (kind in _NEEDS_AT and not has_at) or (kind in _NEEDS_DIGIT and not has_digit):
            continue
        for m in pattern.finditer(norm):
            start, end = m.span(group)
            if 1 in taken[start:end] or not ok(m.group(group)):
                continue
            taken[start:end] = b"\x01" * (end - start)
            if kind in _NOT_REPORTED:
                continue
            if origin is not None:
                start, end = origin[start], _origin_end(origin, end, len(text))
            found.append(PiiSpan(kind, start, end))
    found.sort(key=lambda s: s.start)
    return found


def _check_policy(policy: Mapping[str, str]) -> dict[str, str]:
    for kind, action in policy.items():
        if kind not in KINDS:
            raise ValueError(f"policy: unknown kind {kind!r}; kinds are {list(KINDS)}")
        if action not in POLICIES:
            raise ValueError(f"policy[{kind!r}]: unknown action {action!r}; "
                             f"choose from {list(POLICIES)}")
    return {k: policy.get(k, "replace") for k in KINDS}


def scrub(text: str, policy: Mapping[str, str] | None = None) -> tuple[str, Counter[str], bool]:
    """(text with 'replace' kinds swapped for placeholders, count per kind, whether a
    'drop' kind was found). Unlisted kinds default to 'replace'."""
    full = _check_policy(policy or {})
    spans = find_pii(text)
    counts = Counter(s.kind for s in spans)
    drop = any(full[s.kind] == "drop" for s in spans)
    out, last = [], 0
    for s in spans:
        if full[s.kind] == "replace":
            out.append(text[last:s.start])
            out.append(PLACEHOLDERS[s.kind])
            last = s.end
    out.append(text[last:])
    return "".join(out), counts, drop


class PiiFilter(Step):
    """Replaces sensitive information with typed placeholders (``<EMAIL>``, ``<CN_ID>``…)
    or drops the document, per kind; counts each kind found (in stats ``modified``)."""

    name = "pii"

    def __init__(self, policy: Mapping[str, str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.policy = _check_policy(policy or {})

    def apply(self, doc: Document) -> Document | str:
        text, counts, drop = scrub(doc.text, self.policy)
        for kind, n in counts.items():
            self.modified(f"found_{kind}", n)
        if drop:
            kinds = sorted(k for k in counts if self.policy[k] == "drop")
            return "pii_" + "+".join(kinds)
        if counts:
            doc.text = text
            doc.metadata["pii"] = dict(counts)
        return doc
