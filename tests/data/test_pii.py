"""Unit tests for the PII detectors and the scrubber (``llmforge.data.pii``)."""

from __future__ import annotations

import itertools
import pickle

import pytest

from llmforge.data.pii import KINDS, PLACEHOLDERS, PIIMatch, PIIScrubber, ScrubResult, find_pii, scrub
from llmforge.errors import UserInputError


def found(text: str, kind: str) -> list[str]:
    """The texts of the ``kind`` matches in ``text`` (all detectors on, as the pipeline runs them)."""
    return [m.text for m in find_pii(text) if m.kind == kind]


def only(kind: str, text: str) -> list[str]:
    return [m.text for m in find_pii(text, [kind])]


# --------------------------------------------------------------------------------------------------------
# e-mail

EMAIL_POSITIVES = [
    "john.doe@example.com",
    "jane+newsletter@gmail.com",
    "a.b-c_d@mail.sub.example.co.uk",
    "first.last99@students.monash.edu.au",
    "INFO@EXAMPLE.ORG",
    "kontakt@münchen-reisen.de",
    "user@пример.рф",
    "shop@store.xn--p1ai",
    "o'brien.x@x.io".replace("'", ""),
]


@pytest.mark.parametrize("addr", EMAIL_POSITIVES)
def test_email_positives(addr: str) -> None:
    assert found(f"Write to {addr} today.", "email") == [addr]
    assert found(f"<{addr}>", "email") == [addr]
    assert found(f"mailto:{addr}", "email") == [addr]
    assert found(f"({addr}).", "email") == [addr]


@pytest.mark.parametrize(
    "text",
    [
        "ssh admin@localhost",
        "follow @johndoe on social",
        "class A:\n    @property\n    def x(self): ...",
        "@app.route('/')",
        "<img src='icon@2x.png'> and logo@3x.webp and hero@1.5x.jpg",
        "npm i lodash@4.17.21 react@18.2.0",
        "import '@babel/core'",
        "user@ example.com",
        "a@b",
    ],
)
def test_email_negatives(text: str) -> None:
    assert found(text, "email") == []


def test_email_trailing_punctuation_and_dots() -> None:
    assert found("mail me at bob@example.com.", "email") == ["bob@example.com"]
    assert found("x..y@example.com", "email") == []  # `..` is not a valid local part
    assert found("--bob@example.com", "email") == ["bob@example.com"]


# --------------------------------------------------------------------------------------------------------
# phone

PHONE_POSITIVES = [
    "+44 20 7946 0958",
    "(555) 123-4567",
    "+1-202-555-0143",
    "020 7946 0958",
    "555.123.4567",
    "202 555 0143",
    "+1 (202) 555-0143",
    "1-800-555-0199",
    "+14155552671",
    "+44 (0)20 7946 0958",
    "0044 20 7946 0958",
    "+49 30 12345678",
    "030 12345678",
    "030/12345678",
    "06 12 34 56 78",
    "06.12.34.56.78",
    "+33 6 12 34 56 78",
    "+91 98765 43210",
    "+81 3-1234-5678",
    "03-1234-5678",
    "+55 11 91234-5678",
    "020-123 4567",
    "(+44) 20 7946 0958",
]


@pytest.mark.parametrize("number", PHONE_POSITIVES)
def test_phone_positives(number: str) -> None:
    assert found(f"Call {number} today.", "phone") == [number]
    assert found(f"tel:{number}", "phone") == [number]
    assert found(f"({number})", "phone") == [number]


@pytest.mark.parametrize(
    "text",
    [
        "Released on 2023-10-05 at 12:30:45.",
        "date 05/10/2023 and 10.05.2023",
        "Windows 10.0.19041.1234 and v1.2.3.4",
        "Order #123456789 shipped",
        "ISBN 978-3-16-148410-0 and 0-306-40615-2",
        "unix time 1696502400 or 1696502400123",
        "SKU 4006381333931 costs $1,299.99",
        "population 1,234,567,890",
        "years 2010-2015 and zip 90210-1234",
        "coordinates 51.5074, -0.1278",
        "we handled 065.306.521 requests",
        "P/N 0931-0152-34",
        "tracking 1Z 21L YG6 06 3969 6871",
        "account NL88 JQBT 0898 9479 02",
        "MAC 03-63-11-19-03-CC",
        "plain 5551234567 number",
        "+12345678 views",
        "10 000 000 people",
        "1) 555 item",
        "card 4111 1111 1111 1111",
    ],
)
def test_phone_negatives(text: str) -> None:
    assert found(text, "phone") == []


# --------------------------------------------------------------------------------------------------------
# IP addresses


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("from 81.2.69.142 at", "81.2.69.142"),
        ("http://81.2.69.142:8080/x", "81.2.69.142"),
        ("net 81.2.69.0/24", "81.2.69.0"),
        ("ip=8.8.8.8.", "8.8.8.8"),
        ("ends with 1.1.1.1", "1.1.1.1"),
    ],
)
def test_ipv4_positives(text: str, addr: str) -> None:
    assert found(text, "ipv4") == [addr]


@pytest.mark.parametrize(
    "text",
    [
        "router 192.168.1.1, 10.0.0.1, 172.16.5.4, 127.0.0.1, 0.0.0.0, 169.254.1.1, 100.64.0.1",
        "netmask 255.255.255.0 broadcast 224.0.0.1",
        "docs 192.0.2.1 198.51.100.7 203.0.113.9",
        "v1.2.3.4 and version 1.2.3.4 and pkg==1.2.3.4 and Version: 4.2.1.7",
        "OID 1.3.6.1.4.1.311 and 1.2.3.4.5",
        "bad 256.1.2.3 and 01.02.03.04",
        "Firefox/1.2.3.4",
    ],
)
def test_ipv4_negatives(text: str) -> None:
    assert found(text, "ipv4") == []


@pytest.mark.parametrize(
    "addr",
    [
        "2a00:1450:4001:82b::200e",
        "2606:4700::6810:85e5",
        "2001:4860:4860::8888",
        "2a00:1450:4001:0829:0000:0000:0000:200e",
        "2A00:1450:4001:82B::200E",
        "::ffff:81.2.69.142",
    ],
)
def test_ipv6_positives(addr: str) -> None:
    assert found(f"addr {addr} ok", "ipv6") == [addr]
    assert found(f"[{addr}]:443", "ipv6") == [addr]
    assert found(f"resolver {addr}.", "ipv6") == [addr]


@pytest.mark.parametrize(
    "text",
    [
        "::",
        "loopback ::1 and link fe80::1ff:fe23:4567:890a and ula fd12:3456:789a::1",
        "docs 2001:db8::8a2e:370:7334 multicast ff02::1",
        "at 12:30:45 and 2023-10-05T12:30:45Z",
        "MAC 00:1A:2B:3C:4D:5E",
        "std::vector<int> Foo::Bar a::b cafe::face dead::beef",
        "::ffff:192.168.1.1",
    ],
)
def test_ipv6_negatives(text: str) -> None:
    assert found(text, "ipv6") == []


# --------------------------------------------------------------------------------------------------------
# credit cards

CARD_POSITIVES = [
    "4111 1111 1111 1111",  # Visa
    "4111-1111-1111-1111",
    "4111111111111111",
    "5555 5555 5555 4444",  # Mastercard
    "2223 0031 2200 3222",  # Mastercard 2-series
    "3782 822463 10005",  # Amex
    "378282246310005",
    "6011 1111 1111 1117",  # Discover
    "3056 930902 5904",  # Diners 14
    "3530 1113 3330 0000",  # JCB
    "6200 0000 0000 0005",  # UnionPay
]


@pytest.mark.parametrize("card", CARD_POSITIVES)
def test_card_positives(card: str) -> None:
    assert found(f"card {card} exp", "credit_card") == [card]
    assert found(f"Card number: {card}.", "credit_card") == [card]


def test_card_followed_by_expiry_or_cvv() -> None:
    assert found("4111 1111 1111 1111 12/27 123", "credit_card") == ["4111 1111 1111 1111"]
    assert found("4111-1111-1111-1111 123", "credit_card") == ["4111-1111-1111-1111"]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # Luhn fails
        "1234 5678 9012 3456",
        "9999 9999 9999 9995",  # Luhn ok, no issuer
        "4111 11111 1111 111",  # odd grouping
        "4111 1111-1111 1111",  # mixed separators
        "IMEI 352099001761481",
        "#4111111111111111",
        "4111111111111111.50",
        "9400 1000 0000 0000 0000 00",
        "4855-0201-3461-1314-954",
        "ref 41111111111111110000",
    ],
)
def test_card_negatives(text: str) -> None:
    assert found(text, "credit_card") == []


# --------------------------------------------------------------------------------------------------------
# IBAN


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "GB82WEST12345698765432",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91 ABNA 0417 1643 00",
        "NO93 8601 1117 947",
        "CH93 0076 2011 6238 5295 7",
    ],
)
def test_iban_positives(iban: str) -> None:
    assert found(f"IBAN: {iban} BIC COBADEFFXXX", "iban") == [iban]
    assert found(f"pay to {iban}.", "iban") == [iban]


@pytest.mark.parametrize(
    "text",
    [
        "DE89 3704 0044 0532 0130 01",  # checksum
        "DE89 3704 0044 0532 0130",  # too short for DE
        "XX89 3704 0044 0532 0130 00",  # no such country
        "VAT DE123456789",
        "GB82WEST123456987654321",  # too long, glued
    ],
)
def test_iban_negatives(text: str) -> None:
    assert found(text, "iban") == []


# --------------------------------------------------------------------------------------------------------
# SSN


def test_ssn() -> None:
    assert found("SSN 123-45-6789.", "ssn") == ["123-45-6789"]
    assert found("Social Security Number: 123 45 6789", "ssn") == ["123 45 6789"]
    assert found("ssn: 123456789", "ssn") == ["123456789"]
    for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000"]:
        assert found(f"SSN {bad}", "ssn") == [], bad
    assert found("ref 123 45 6789 and 123456789", "ssn") == []  # no label, no dashes
    assert found("part 123-45-6789-1 and x123-45-6789", "ssn") == []


# --------------------------------------------------------------------------------------------------------
# secrets

SECRET_POSITIVES = [
    ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("ASIA2Y3Z4ABCDEFGHIJK", "ASIA2Y3Z4ABCDEFGHIJK"),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a ok", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    (
        "github_pat_11ABCDEFG0123456789abc_" + "a1B2c3D4e5" * 5 + "abcdefghi",
        "github_pat_11ABCDEFG0123456789abc_" + "a1B2c3D4e5" * 5 + "abcdefghi",
    ),
    ("SLACK=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", None),
    ("https://hooks.slack.com/services/T0123ABCD/B0123ABCDE/abcdefghij0123456789ABCD", None),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("key=AIzaSyD-1234567890abcdefghijklmnopqrstu", "AIzaSyD-1234567890abcdefghijklmnopqrstu"),
    ("OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),
    (
        "jwt eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    ("Authorization: Bearer 8f3a2b1c9d4e5f60718293a4b5c6d7e8", "8f3a2b1c9d4e5f60718293a4b5c6d7e8"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ('api_key = "9f8a7b6c5d4e3f2a1b0c"', "9f8a7b6c5d4e3f2a1b0c"),
    ("db_password: 'S3cure!Pass2023'", "S3cure!Pass2023"),
]


@pytest.mark.parametrize(("text", "secret"), SECRET_POSITIVES)
def test_secret_positives(text: str, secret: str | None) -> None:
    got = found(text, "secret")
    assert len(got) == 1, got
    if secret is not None:
        assert got == [secret]


def test_pem_block_is_one_secret() -> None:
    body = "\n".join(["MIIEpAIBAAKCAQEA7bq8xYz0" * 2 + "abcdefghABCDEFGH"] * 3)
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    text = f"key:\n{block}\nthanks"
    assert found(text, "secret") == [block]
    # Truncated before END: up to the end of the base64 body, not into the prose after it.
    cut = f"-----BEGIN PRIVATE KEY-----\n{body}"
    assert found(f"{cut}\nThanks for the help", "secret") == [cut]
    # JSON-escaped newlines (service-account files).
    escaped = block.replace("\n", "\\n")
    assert found(f'{{"private_key": "{escaped}\\n"}}', "secret") == [escaped]


@pytest.mark.parametrize(
    "text",
    [
        "pip install scikit-learn  # sk-learn",
        "the bearer of this card",
        'api_key = os.environ["API_KEY"]',
        'password = "changeme"',
        'token: "YOUR_TOKEN_HERE"',
        'api_key = "${API_KEY}"',
        "Authorization: Bearer $TOKEN",
        "commit 3f786850e387550fdab836ed7e6dc881de23001b",
        "id 123e4567-e89b-12d3-a456-426614174000",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUF\n-----END CERTIFICATE-----",
        "AKIA is the prefix of AWS access key ids",
        "ghp_ tokens are GitHub's",
        "password_hint = 'my first pet1'",
        "integrity=sha384-oqVuAfXRKap7fdgcCY5uykM6+R9GqQ8K/uxy9rx7HNQlGYl1kPzQho1wx4JwY8wC",
    ],
)
def test_secret_negatives(text: str) -> None:
    assert found(text, "secret") == []


# --------------------------------------------------------------------------------------------------------
# find_pii: ordering, overlaps, kinds


def test_matches_sorted_and_consistent() -> None:
    text = "Mail a@b.io, call +44 20 7946 0958, card 4111 1111 1111 1111, ip 81.2.69.142."
    ms = find_pii(text)
    assert [m.kind for m in ms] == ["email", "phone", "credit_card", "ipv4"]
    for m in ms:
        assert isinstance(m, PIIMatch)
        assert text[m.start : m.end] == m.text
    assert all(a.end <= b.start for a, b in itertools.pairwise(ms))


def test_overlap_priority() -> None:
    # An e-mail inside a secret assignment: the secret claims the span, the e-mail is not reported.
    ms = find_pii('password = "alice99@corp-mail.com"')
    assert [(m.kind, m.text) for m in ms] == [("secret", "alice99@corp-mail.com")]
    # 012-34-5678 is a valid SSN and also the shape of a trunk-0 phone: SSN outranks phone.
    assert [m.kind for m in find_pii("SSN 012-34-5678")] == ["ssn"]
    assert [m.kind for m in find_pii("SSN 012-34-5678", ["phone"])] == ["phone"]
    # A bearer JWT is found by two secret rules with the same span: reported once.
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    assert [m.text for m in find_pii(f"Authorization: Bearer {jwt}")] == [jwt]


def test_kinds_subset_and_errors() -> None:
    text = "a@b.io 81.2.69.142"
    assert [m.kind for m in find_pii(text, ["ipv4"])] == ["ipv4"]
    assert [m.kind for m in find_pii(text, "email")] == ["email"]  # a bare string is one kind
    assert find_pii("", KINDS) == []
    with pytest.raises(UserInputError, match="unknown PII kind 'mac'"):
        find_pii(text, ["mac"])


# --------------------------------------------------------------------------------------------------------
# scrub / PIIScrubber

ALL_REDACT = dict.fromkeys(KINDS, "redact")


def test_redact_uses_typed_placeholders() -> None:
    text = (
        "Mail jo@x.com or +44 20 7946 0958 from 81.2.69.142 / 2a00:1450::200e; card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, key AKIAIOSFODNN7EXAMPLE."
    )
    res = scrub(text, ALL_REDACT)
    assert res.text == (
        "Mail <EMAIL> or <PHONE> from <IP_ADDRESS> / <IP_ADDRESS>; card <CREDIT_CARD>, "
        "IBAN <IBAN>, SSN <SSN>, key <SECRET>."
    )
    assert res.counts == dict.fromkeys(KINDS, 1)
    assert not res.drop and res.drop_kinds == []
    assert set(PLACEHOLDERS) == set(KINDS)


def test_drop_document_and_keep() -> None:
    text = "write to jo@x.com, key AKIAIOSFODNN7EXAMPLE"
    res = scrub(text, {"email": "redact", "secret": "drop-document"})
    assert res.drop and res.drop_kinds == ["secret"]
    assert res.text == "write to <EMAIL>, key AKIAIOSFODNN7EXAMPLE"
    assert res.counts == {"email": 1, "secret": 1}
    # keep = not scanned, not counted, left as is; missing kinds are kept.
    res = scrub(text, {"email": "keep", "phone": "redact"})
    assert res == ScrubResult(text=text, counts={}, drop=False, drop_kinds=[])
    assert scrub(text, {}).text == text
    assert not scrub("nothing here", {"secret": "drop-document"}).drop


def test_bad_actions_raise() -> None:
    with pytest.raises(UserInputError, match="unknown PII kind 'enabled'"):
        PIIScrubber({"enabled": "redact"})
    with pytest.raises(UserInputError, match="unknown PII action 'mask' for kind 'email'"):
        scrub("x", {"email": "mask"})


def test_scrubber_pickles_and_reuses() -> None:
    s = PIIScrubber({"email": "redact", "secret": "drop-document"})
    clone = pickle.loads(pickle.dumps(s))
    assert clone == s
    text = "ping a@b.io"
    assert clone(text) == s(text) == scrub(text, {"email": "redact", "secret": "drop-document"})
    assert len(pickle.dumps(s)) < 400  # only the action table travels to workers


@pytest.mark.parametrize(
    "text",
    [
        "a@b.io555-123-4567 and x@y.com81.2.69.142",
        "4111 1111 1111 1111 4111 1111 1111 1111",
        "+44 20 7946 0958+44 20 7946 0958",
        "SSN 123-45-6789-123-45-6789",
        "call (555) 123-4567)(555) 123-4567",
    ],
)
def test_scrub_is_idempotent_on_adjacent_pii(text: str) -> None:
    once = scrub(text, ALL_REDACT).text
    assert scrub(once, ALL_REDACT).text == once
