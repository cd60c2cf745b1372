"""PII detection: a generated labeled set with hard negatives checks the issue's targets
(recall >= 0.99, precision >= 0.98); unit tests pin the validators and the policies."""
import ipaddress
import random
import string

import pytest

from dsv3.data.corpus import embedded_corpus
from dsv3.data.document import Document
from dsv3.data.pii import (PiiFilter, find_pii, luhn_ok, scrub, valid_bank_card, valid_cn_id)

_ID_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_REGIONS = ["110105", "310101", "440305", "330106", "510104", "350102", "620102", "650102",
            "210102", "420106", "130102", "610113"]


def _id_check(body17):
    return "10X98765432"[sum(int(c) * w for c, w in zip(body17, _ID_W)) % 11]


def _id_body(rng):
    y, m, d = rng.randint(1940, 2010), rng.randint(1, 12), rng.randint(1, 28)
    return f"{rng.choice(_REGIONS)}{y:04d}{m:02d}{d:02d}{rng.randint(0, 999):03d}"


def _luhn_digit(partial):
    for c in "0123456789":
        if luhn_ok(partial + c):
            return c


def _card(rng):
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("62", 19), ("62", 16),
                                 ("37", 15), ("6011", 16), ("3530", 16)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + _luhn_digit(body)


def _group4(d, sep):
    return sep.join(d[i:i + 4] for i in range(0, len(d), 4))


def _fullwidth(s):
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def _rand(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def positive(rng):
    """(kind, text as written, offset of the sensitive part within it, its length)."""
    kind = rng.choice(["email", "phone_cn", "phone_intl", "cn_id", "bank_card", "ipv4",
                       "ipv6", "url_credentials", "secret"])
    if kind == "email":
        local = rng.choice([_rand(rng, string.ascii_lowercase, rng.randint(3, 10)),
                            "zhang.san", "li_si+news", "w.wang88"])
        v = f"{local}@{rng.choice(['example.com', 'mail.qq.com', 'corp.example.org', '163.com'])}"
        v = _fullwidth(v) if rng.random() < 0.1 else v
        return "email", v, 0, len(v)
    if kind == "phone_cn":
        num = rng.choice("3456789") + _rand(rng, string.digits, 9)
        num = "1" + num
        v = rng.choice([num, f"+86 {num}", f"+86-{num[:3]}-{num[3:7]}-{num[7:]}",
                        f"{num[:3]} {num[3:7]} {num[7:]}", f"0086{num}", _fullwidth(num)])
        return "phone", v, 0, len(v)
    if kind == "phone_intl":
        v = rng.choice([f"+44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
                        f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
                        f"+49 30 {rng.randint(1000000, 99999999)}",
                        f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
                        f"({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"])
        return "phone", v, 0, len(v)
    if kind == "cn_id":
        body = _id_body(rng)
        return "cn_id", body + _id_check(body), 0, 18
    if kind == "bank_card":
        d = _card(rng)
        v = rng.choice([d, _group4(d, " "), _group4(d, "-")]) if len(d) == 16 else d
        return "bank_card", v, 0, len(v)
    if kind == "ipv4":
        v = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        return "ip", v, 0, len(v)
    if kind == "ipv6":
        v = str(ipaddress.IPv6Address(rng.getrandbits(128) & ~(0xFFFF << 64) | (0x2001 << 112)))
        return "ip", v, 0, len(v)
    if kind == "url_credentials":
        cred = f"{_rand(rng, string.ascii_lowercase, 6)}:{_rand(rng, string.ascii_letters + string.digits, 12)}"
        v = f"{rng.choice(['https', 'postgres', 'ftp'])}://{cred}@db{rng.randint(1, 9)}.example.com/data"
        return "url_credentials", v, v.index("//") + 2, len(cred)
    alnum = string.ascii_letters + string.digits
    secret = rng.choice(["AKIA" + _rand(rng, string.ascii_uppercase + string.digits, 16),
                         "ghp_" + _rand(rng, alnum, 36), "sk-" + _rand(rng, alnum, 40)])
    if rng.random() < 0.4:
        value = _rand(rng, alnum, 24)
        v = f'api_key = "{value}"'
        return "secret", v, v.index(value), len(value)
    return "secret", secret, 0, len(secret)


def hard_negative(rng):
    """Text that looks like PII and is not."""
    kind = rng.choice(["order", "timestamp", "id_bad_check", "card_bad_luhn", "version",
                       "price", "handle", "weak_password", "ip_invalid", "time"])
    if kind == "order":
        return rng.choice([f"订单号 {rng.randint(2019, 2025)}{rng.randint(10**11, 10**12 - 1)}",
                           f"ORD-{rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(10000, 99999)}",
                           f"order #{rng.randint(10**9, 10**10 - 1)}"])
    if kind == "timestamp":
        return rng.choice([f"{rng.randint(1600000000, 1800000000)}",
                           f"{rng.randint(1600000000000, 1800000000000)}",
                           f"2023-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:{rng.randint(10, 59)}:05Z",
                           f"{rng.randint(2019, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
                           f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"])
    if kind == "id_bad_check":
        body = _id_body(rng)
        bad = rng.choice([c for c in "0123456789X" if c != _id_check(body)])
        return body + bad
    if kind == "card_bad_luhn":
        d = _card(rng)
        d = d[:-1] + str((int(d[-1]) + rng.randint(1, 9)) % 10)
        return rng.choice([d, _group4(d, " ")]) if len(d) == 16 else d
    if kind == "version":  # three- and four-part versions, spec section numbers
        return rng.choice([f"v{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
                           f"version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 99)}",
                           f"section {rng.randint(1, 9)}.{rng.randint(1, 9)}.{rng.randint(1, 9)}.{rng.randint(1, 60)}"])
    if kind == "price":
        return f"¥{rng.randint(1, 99)},{rng.randint(100, 999)}.00"
    if kind == "handle":
        return f"@{_rand(rng, string.ascii_lowercase, 7)}"
    if kind == "weak_password":
        return rng.choice(["password = changeme", "api_key: YOUR_API_KEY_HERE",
                           "secret=<redacted>", "password = HTTPPasswordMgr.find_user_password"])
    if kind == "ip_invalid":
        return f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}"
    return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"


_EN = ["Please contact {} for details.", "The record shows {} as of today.", "Logged: {}.",
       "See entry {} in the table below.", "He wrote {} on the form."]
_ZH = ["请通过{}联系我们。", "系统记录显示{}。", "客户填写的信息是 {} ，请核对。", "备注：{}。"]


def labeled_set(n_docs, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        text, spans = "", []
        for _ in range(rng.randint(1, 3)):
            template = rng.choice(_EN + _ZH)
            if rng.random() < 0.5:
                kind, v, off, length = positive(rng)
                at = len(text) + template.index("{}")
                spans.append((kind, at + off, at + off + length))
            else:
                v = hard_negative(rng)
            # Chinese runs on without spaces; English sentences are separated
            text += template.format(v) + rng.choice([" ", "\n", ""] if template in _ZH else [" ", "\n"])
        docs.append((text, spans))
    return docs


def measure(docs):
    tp = n_true = n_pred = 0
    misses, false = [], []
    for text, spans in docs:
        truth = set(spans)
        found = {(s.kind, s.start, s.end) for s in find_pii(text)}
        tp += len(truth & found)
        n_true += len(truth)
        n_pred += len(found)
        misses += [(text, text[s:e], k) for k, s, e in truth - found]
        false += [(text, text[s:e], k) for k, s, e in found - truth]
    return tp / n_true, tp / n_pred, misses, false


def test_recall_and_precision_targets_on_generated_set_with_hard_negatives():
    # seed 7: the rules were tuned looking at seed 0, so this set is held out
    recall, precision, misses, false = measure(labeled_set(3000, seed=7))
    assert recall >= 0.99, f"recall {recall:.4f}; missed e.g. {misses[:5]}"
    assert precision >= 0.98, f"precision {precision:.4f}; false e.g. {false[:5]}"


@pytest.mark.parametrize("text", [
    "11010519491231002X",        # the GB 11643 example: valid
])
def test_valid_id(text):
    assert valid_cn_id(text) and valid_cn_id(text.lower())


@pytest.mark.parametrize("text, why", [
    ("110105194912310021", "wrong check character"),
    ("110105194902300020", "February 30th"),
    ("910105194912310020", "no region starts with 9"),
])
def test_invalid_id(text, why):
    assert not valid_cn_id(text), why


def test_bank_card_validation():
    assert valid_bank_card("4111 1111 1111 1111") and valid_bank_card("4111-1111-1111-1111")
    assert not valid_bank_card("4111111111111112")          # Luhn fails
    assert not valid_bank_card("1234567812345670")          # Luhn passes, no network starts with 1
    body = "35010219900101123"                               # ID-shaped 18 digits, Fujian region
    assert not valid_bank_card(body + _luhn_digit(body))


def test_spans_index_the_original_text_after_nfkc():
    text = "邮箱：ｌｉ．ｓｉ＠ｅｘａｍｐｌｅ．ｃｏｍ，电话１３８１２３４５６７８。"
    spans = find_pii(text)
    assert [(s.kind, text[s.start:s.end]) for s in spans] == [
        ("email", "ｌｉ．ｓｉ＠ｅｘａｍｐｌｅ．ｃｏｍ"), ("phone", "１３８１２３４５６７８")]


def test_scrub_policies_and_filter_step():
    text = "mail a.b@example.com, card 4111 1111 1111 1111."
    out, counts, drop = scrub(text)
    assert out == "mail <EMAIL>, card <BANK_CARD>." and counts == {"email": 1, "bank_card": 1}
    assert not drop
    out, _, drop = scrub(text, {"email": "keep", "bank_card": "drop"})
    assert drop and out == text
    step = PiiFilter({"bank_card": "drop"})
    docs = [Document(id="1", text=text), Document(id="2", text="mail a.b@example.com")]
    kept = list(step(docs))
    assert [d.text for d in kept] == ["mail <EMAIL>"] and kept[0].metadata["pii"] == {"email": 1}
    assert step.stats.dropped == {"pii_bank_card": 1}
    assert step.stats.modified == {"found_email": 2, "found_bank_card": 1}


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"policy: unknown kind 'ssn'"):
        scrub("x", {"ssn": "drop"})
    with pytest.raises(ValueError, match=r"policy\['email'\]: unknown action 'mask'"):
        PiiFilter({"email": "mask"})
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        find_pii(b"a@b.com")


def _kinds(text):
    return [(s.kind, text[s.start:s.end]) for s in find_pii(text)]


@pytest.mark.parametrize("text", [
    "y = x[::2]", "a[1::2]", "buf[::16]", "m[:, ::4]", "b = buf[1024::4]", "rev = s[::-1]",
    "copy = x[::1]", "1:2:3:4:5:6:7:8", "ab:cd::", "ab:cd::1", "net ab:cd::/32",
    "loopback ::1 only",
])
def test_slices_and_colon_runs_are_not_ipv6(text):
    assert _kinds(text) == []


@pytest.mark.parametrize("text, address", [
    ("host 2001:db8::1 is down", "2001:db8::1"),
    ("iface fe80::1%eth0 up", "fe80::1%eth0"),
    ("on fe80::1%eth0.100.", "fe80::1%eth0.100"),
    ("see http://[2001:db8::1]:8080/", "2001:db8::1"),
    ("dns 2001:4860:4860::8888.", "2001:4860:4860::8888"),
    ("addr 2001:0db8:85a3:0000:0000:8a2e:0370:7334 ok", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("地址：fe80::abcd", "fe80::abcd"),
])
def test_real_ipv6_addresses_are_found(text, address):
    assert _kinds(text) == [("ip", address)]


def test_code_domain_slices_survive_scrubbing():
    """The demo config scrubs the code domain: tarfile's sparse[::2] came out sparse[<IP>]
    (a URL's "http://[<IP>]:1234" is an address, rightly scrubbed)."""
    import re
    for doc in embedded_corpus(["code"]):
        if "::" in doc.text:
            assert re.search(r"\w\[<IP>\]", scrub(doc.text)[0]) is None, doc.id


@pytest.mark.parametrize("text", [
    "Python 3.12.1.0", "Version: v10.2.3.4", "numpy==3.12.1.0", "build 3.12.1.0-rc",
    "版本号：3.12.1.0", "released 3.12.1.0 today", "Chrome/120.0.0.0 Safari",
    "numpy==10.2.3.4", "pip install pkg[extra]~=10.2.3.4", "torch===10.2.3.4; python_version",
    "about +10 000 000 people", "seasons +2024 2025", "+10 555 123 4567",
])
def test_versions_and_amounts_are_not_ips_or_phones(text):
    assert _kinds(text) == []


@pytest.mark.parametrize("text, address", [
    ("if ip == 192.168.1.23: block()", "192.168.1.23"),
    ("host != 10.20.30.40", "10.20.30.40"),
    ("update 192.168.1.15 with the patch", "192.168.1.15"),
    ("release: 172.16.5.4", "172.16.5.4"),
    ("if ip>=10.20.30.40 or ip<=10.20.30.99", "10.20.30.40"),
    ("host_ip==10.20.30.40", "10.20.30.40"),  # a name that says address: no pin
    ("pkg == 10.2.3.4", "10.2.3.4"),  # a pin has no spaces: this is a comparison
    ("version 10.2.3.4", "10.2.3.4"), ("build 10.2.3.4-rc", "10.2.3.4"),
    ("版本号：10.2.3.4", "10.2.3.4"), ("kernel 10.2.3.4", "10.2.3.4"),
    ("driver 10.2.3.4", "10.2.3.4"), ("patch: 10.2.3.4", "10.2.3.4"),
])
def test_an_address_is_found_whatever_precedes_it_but_a_pin(text, address):
    """Privacy over false positives: a number that parses as a host address is one,
    after a comparison or a word such as "update"; only "pkg==10.2.3.4" is a version."""
    assert (_kinds(text) or [None])[0] == ("ip", address)


@pytest.mark.parametrize("text, kind, value", [
    ("the server at 10.2.3.4 is down", "ip", "10.2.3.4"),
    ("ip 192.168.1.20.", "ip", "192.168.1.20"),
    ("call (+44) 20 7946 0958 now", "phone", "(+44) 20 7946 0958"),
    ("call +34 912 345 678", "phone", "+34 912 345 678"),
    ("call +1 (212) 555-0199", "phone", "+1 (212) 555-0199"),
    ("jörg.müller@firma.de wrote", "email", "jörg.müller@firma.de"),
    ("write to user@münchen.de", "email", "user@münchen.de"),
    ("почта иван@пример.рф", "email", "иван@пример.рф"),
    ("请通过li.si@example.com联系我们。", "email", "li.si@example.com"),
    ("ติดต่อjohn@example.comครับ", "email", "john@example.com"),  # Thai
    ("ຕິດຕໍ່john@example.comເດີ", "email", "john@example.com"),  # Lao
    ("ទាក់ទងjohn@example.comបាទ", "email", "john@example.com"),  # Khmer
    ("ဆက်သွယ်john@example.comပါ", "email", "john@example.com"),  # Myanmar
    ("Amex 3782 822463 10005", "bank_card", "3782 822463 10005"),
    ("Diners 3056 930902 5904", "bank_card", "3056 930902 5904"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("ACCESS_KEY: 'Xq7Lm2Pz9Rt4Vb8Nc3Kd'", "secret", "Xq7Lm2Pz9Rt4Vb8Nc3Kd"),
])
def test_found_with_the_whole_value(text, kind, value):
    assert _kinds(text) == [(kind, value)]


def test_nfd_email_is_scrubbed_whole():
    import unicodedata
    text = unicodedata.normalize("NFD", "mail jörg.müller@firma.de now")
    assert scrub(text)[0] == "mail <EMAIL> now"


def _repeat(unit, prefix="", size=200_000):
    return (prefix + unit * (size // len(unit) + 1))[:size]


_ADVERSARIAL = [_repeat(u) for u in [
    "1::", "fe80::1%", "-----BEGIN PRIVATE KEY-----", "(+44) ", "3782 ", "1-", "a%", "a.", "ü@",
    "a@a.", "secret_", "aws_secret_access_key_", "password=", "1.1.", "version 1.", "http://a:",
    "::", "+1 0", "a==1.1.", "a[a,", "ติดต่อa@"]] + [
    _repeat("a.", prefix="x@"),  # url_credentials' scheme ran to the end of the a.a.a. run
]
# text with a hit of each common kind, at the speed of ordinary text
_BASELINE = _repeat("Mail bob@example.com or call 555-123-4567; host 10.2.3.4 runs pkg==1.2.3. ")


def _seconds(text):
    import time
    start = time.perf_counter()
    find_pii(text)
    return time.perf_counter() - start


@pytest.mark.parametrize("text", _ADVERSARIAL, ids=lambda t: repr(t[:12]))
def test_adversarial_200kb_inputs_stay_fast(text):
    """As fast as ordinary text of the same size, timed just before on the same
    machine: both take about 0.05 s on one core, where a quadratic case (a list of
    claimed spans scanned per hit, a private-key body or a URL scheme scanned to the
    end of the text at each start) took 7-12 s. The limit, 20x the baseline and at
    least 2 s, holds on a loaded machine; a slow run is retried once before failing."""
    for _ in range(2):
        limit = max(2.0, 20 * _seconds(_BASELINE))
        took = _seconds(text)
        if took < limit:
            return
    pytest.fail(f"took {took:.2f} s, limit {limit:.2f} s (20x ordinary text of the same size)")


@pytest.mark.parametrize("text, kind, value", [
    # a password holding punctuation: the value stopped at the first "#"
    ("DB_PASSWORD=Xk9#mP2$vL8@qR4!nT6", "secret", "Xk9#mP2$vL8@qR4!nT6"),
    ('passwd: "s3cr3t!Passw0rd#2024", next', "secret", "s3cr3t!Passw0rd#2024"),
    # North American numbers with dots or spaces (only (555) 123-4567 and dashes were)
    ("call 415.555.2671 today", "phone", "415.555.2671"),
    ("call 415 555 2671 today", "phone", "415 555 2671"),
    # kinds that were not looked for
    ("IBAN: DE89 3704 0044 0532 0130 00.", "iban", "DE89 3704 0044 0532 0130 00"),
    ("pay GB82WEST12345698765432 now", "iban", "GB82WEST12345698765432"),
    ("SSN: 078-05-1120", "us_ssn", "078-05-1120"),
    # a card written with dots
    ("card 4111.1111.1111.1111", "bank_card", "4111.1111.1111.1111"),
    # a Chinese mobile run into its label is still one
    ("手机13812345678", "phone", "13812345678"),
])
def test_formats_that_were_missed_are_found(text, kind, value):
    spans = find_pii(text)
    assert [(s.kind, text[s.start:s.end]) for s in spans] == [(kind, value)]


@pytest.mark.parametrize("text", [
    "The fund held 15000000000 yuan in 2020.",  # an amount of 11 digits starting 15
    "row id 13800000000 was updated",
    "y = a[dec::-1]",  # a slice of a named start, not the address "dec::"
    "x = buf[abc::]",
    "IBAN: DE88 3704 0044 0532 0130 00",  # a wrong check digit
    "case 000-12-3456 and 666-12-3456 and 912-34-5678",  # not issued as SSNs
    "the password=changeme default",  # not random: no secret
])
def test_look_alikes_of_those_formats_are_left(text):
    assert find_pii(text) == []


@pytest.mark.parametrize("text, value", [
    # national numbers, no country code: a number only after a word that says phone
    ("Tel: 020 7946 0958", "020 7946 0958"),
    ("Call me on 020 7946 0958 today", "020 7946 0958"),
    ("Mobile: 07700 900123", "07700 900123"),
    ("Fax (020) 7946-0958", "(020) 7946-0958"),
    ("my phone number is 0301234567.", "0301234567"),
    ("PHONE 5551234567", "5551234567"),
    ("call us at 555-1234", "555-1234"),
    ("联系电话：010-12345678", "010-12345678"),
    # the same words in Traditional script (Taiwan, Hong Kong): were left unscrubbed
    ("手機：0912-345-678", "0912-345-678"),
    ("電話：(02) 2345-6789", "(02) 2345-6789"),
    ("傳真：02-2345-6789", "02-2345-6789"),
    ("聯絡電話：02-2345-6789", "02-2345-6789"),
])
def test_national_numbers_after_a_phone_word_are_found(text, value):
    """Before: missed (only +CC, North American dashed/dotted and Chinese mobiles)."""
    assert [(s.kind, text[s.start:s.end]) for s in find_pii(text)] == [("phone", value)]


@pytest.mark.parametrize("text", [
    "microphone 12345678 ordered",  # a word ending in "phone"
    "the hotel 0301234567 booking",
    "Phone 2024 2025 models",  # two years
    "the cell 1024 2048 grid",  # "cell" alone: a grid's as often
    "phones sold 1234567 units",
    "tel 123456",  # too short for a number
    "He was 5551234567 in line.",  # no phone word: a bare number stays
    "電話 2024 2025 型號",  # two years, after the Traditional word too
])
def test_numbers_without_a_phone_word_before_them_are_left(text):
    assert find_pii(text) == []
