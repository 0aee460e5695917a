"""A labelled PII test set and the scorer that measures ``llmforge.data.pii`` against it.

``generate(seed)`` builds real-looking documents — web pages, forum posts, invoices, server logs, code
snippets, config files — from templates whose slots are filled with *planted PII* (labelled spans, every kind
in many formats) and *planted look-alikes* that are not PII: versions, dates, times, order ids, ISBNs,
tracking numbers, git SHAs, UUIDs, Luhn-invalid card-like numbers, IBANs with a bad checksum, invalid SSNs,
private/reserved IPs, MAC addresses, decorators and handles, asset names, prices, product codes, public-key
blocks, placeholder credentials. The same seed always gives the same documents.

``evaluate(seed)`` runs ``find_pii`` over every document and scores each kind:

* a prediction is a true positive only if a gold span has the **same kind and exactly the same start and
  end** (strict: a phone missing its ``+`` or a PEM block missing its END line counts as one false positive
  *and* one false negative);
* precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean, support = gold spans.

Test data, not runtime code: ``tests/data/test_pii_eval.py`` asserts the targets
(recall ≥ 0.99, precision ≥ 0.98 per kind).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from llmforge.data.pii import _IBAN_LENGTHS, KINDS, PIIMatch, find_pii, luhn_ok

__all__ = ["LabelledDoc", "evaluate", "format_table", "generate", "score"]


@dataclass(frozen=True)
class LabelledDoc:
    """One generated document and its gold PII spans ``(kind, start, end)``."""

    text: str
    spans: tuple[tuple[str, int, int], ...]
    doc_type: str
    lookalikes: int  # how many planted non-PII look-alikes it holds (for the report)


# --------------------------------------------------------------------------------------------------------
# vocabulary

_FIRST = [
    "james",
    "mary",
    "john",
    "patricia",
    "robert",
    "jennifer",
    "michael",
    "linda",
    "david",
    "elizabeth",
    "william",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "priya",
    "wei",
    "fatima",
    "lukas",
    "sofia",
    "mateo",
    "chloe",
    "hiroshi",
    "olga",
    "ahmed",
    "ingrid",
    "tomasz",
    "aoife",
]
_LAST = [
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "wilson",
    "anderson",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "thompson",
    "white",
    "harris",
    "clark",
    "lewis",
    "schmidt",
    "nguyen",
    "kowalski",
    "oconnor",
    "dubois",
    "rossi",
    "tanaka",
    "novak",
]
_DOMAINS = [
    "gmail.com",
    "outlook.com",
    "yahoo.co.uk",
    "protonmail.ch",
    "northwind-traders.com",
    "contoso.co.uk",
    "fabrikam.io",
    "mail.uni-heidelberg.de",
    "cs.stanford.edu",
    "example-shop.fr",
    "engineering.acme-corp.com",
    "orange.fr",
    "web.de",
    "hospital.nhs.uk",
    "students.monash.edu.au",
    "startup.ai",
]
_IDN_DOMAINS = (
    "münchen-reisen.de",
    "xn--mnchen-3ya.de",
    "bücher-stube.at",
    "пример.рф",
    "shop.xn--p1ai",
    "café.fr",
)
_WORDS = [
    "pipeline",
    "release",
    "server",
    "update",
    "customer",
    "invoice",
    "shipping",
    "support",
    "ticket",
    "network",
    "backup",
    "deploy",
    "storage",
    "migration",
    "feature",
    "report",
    "cluster",
    "database",
    "service",
    "account",
    "billing",
    "payment",
    "request",
    "response",
    "cache",
]


def _name(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_FIRST), rng.choice(_LAST)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    # Random tokens always mix letters and digits (as real keys do); force one of each.
    while True:
        s = "".join(rng.choice(alphabet) for _ in range(n))
        if any(c.isdigit() for c in s) and any(c.isalpha() for c in s):
            return s


# --------------------------------------------------------------------------------------------------------
# planted PII generators (kind, value)


def _email(rng: random.Random) -> str:
    first, last = _name(rng)
    dom = rng.choice(_IDN_DOMAINS) if rng.random() < 0.12 else rng.choice(_DOMAINS)
    local = rng.choice(
        [
            f"{first}.{last}",
            f"{first}{rng.randint(1, 99)}",
            f"{first}+{rng.choice(_WORDS)}",
            f"{first[0]}.{last}",
            f"{first}_{last}{rng.randint(70, 99)}",
            f"{first}-{last}",
            f"{last}.{first}+news",
            f"{first}",
        ]
    )
    addr = f"{local}@{dom}"
    return addr.upper() if rng.random() < 0.05 else addr


def _nanp(rng: random.Random) -> tuple[str, str, str]:
    return str(rng.randint(201, 989)), str(rng.randint(200, 999)), _digits(rng, 4)


def _phone(rng: random.Random) -> str:
    a, e, s = _nanp(rng)
    d = lambda n: _digits(rng, n)  # noqa: E731
    formats = [
        f"({a}) {e}-{s}",
        f"{a}-{e}-{s}",
        f"{a}.{e}.{s}",
        f"+1 {a} {e} {s}",
        f"+1-{a}-{e}-{s}",
        f"+1 ({a}) {e}-{s}",
        f"1-800-{e}-{s}",
        f"+1{a}{e}{s}",
        f"(555) 123-{s}",
        f"+44 20 7946 {d(4)}",
        f"+44 (0)20 7946 {d(4)}",
        f"020 7946 {d(4)}",
        f"0161 496 {d(4)}",
        f"07700 900{d(3)}",
        f"+44 7700 900{d(3)}",
        f"0044 20 7946 {d(4)}",
        f"+442079460{d(3)}",
        f"+49 30 {d(8)}",
        f"030 {d(8)}",
        f"+49 (0)89 {d(7)}",
        f"0171 {d(7)}",
        f"030/{d(8)}",
        f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"01 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"06.{d(2)}.{d(2)}.{d(2)}.{d(2)}",
        f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+91 9{d(4)} {d(5)}",
        f"+91-9{d(4)}-{d(5)}",
        f"+61 2 {d(4)} {d(4)}",
        f"(02) {d(4)} {d(4)}",
        f"0412 {d(3)} {d(3)}",
        f"+81 3-{d(4)}-{d(4)}",
        f"03-{d(4)}-{d(4)}",
        f"+55 11 9{d(4)}-{d(4)}",
        f"+31 20 {d(3)} {d(4)}",
        f"020-{d(3)} {d(4)}",
        f"+34 912 {d(3)} {d(3)}",
        f"+353 1 {d(3)} {d(4)}",
        f"+27 21 {d(3)} {d(4)}",
        f"+86 10 {d(4)} {d(4)}",
    ]
    return rng.choice(formats)


def _global_ipv4(rng: random.Random) -> str:
    while True:
        addr = ipaddress.IPv4Address(rng.randint(0x01000000, 0xDFFFFFFF))
        if addr.is_global and not addr.is_multicast:
            return str(addr)


def _ipv4(rng: random.Random) -> str:
    return _global_ipv4(rng)


_V6_PREFIXES = (
    "2a00:1450",
    "2606:4700",
    "2400:cb00",
    "2a03:2880",
    "2001:4860",
    "2620:1ec",
    "2a02:26f0",
    "2c0f:fb50",
)


def _ipv6(rng: random.Random) -> str:
    if rng.random() < 0.06:
        return f"::ffff:{_global_ipv4(rng)}"
    while True:
        groups = rng.choice(_V6_PREFIXES).split(":") + [f"{rng.randint(0, 0xFFFF):x}" for _ in range(6)]
        for i in rng.sample(range(2, 8), rng.randint(0, 3)):
            groups[i] = "0"
        addr = ipaddress.IPv6Address(":".join(groups))
        if addr.is_global:
            break
    style = rng.random()
    if style < 0.5:
        out = addr.compressed
    elif style < 0.7:
        out = addr.exploded
    elif style < 0.85:
        out = ":".join(f"{int(g, 16):x}" for g in addr.exploded.split(":"))
    else:
        out = addr.compressed.upper()
    return out


_CARD_BRANDS: tuple[tuple[str, int], ...] = (
    ("4", 16),
    ("4", 16),
    ("4", 19),
    ("51", 16),
    ("55", 16),
    ("2221", 16),
    ("2720", 16),
    ("34", 15),
    ("37", 15),
    ("6011", 16),
    ("65", 16),
    ("36", 14),
    ("3530", 16),
    ("62", 16),
    ("2200", 16),
    ("6759", 16),
)


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    for check in string.digits:
        if luhn_ok(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always fits")


def _group_card(num: str, sep: str) -> str:
    n = len(num)
    if n == 15 or n == 14:
        parts = [num[:4], num[4:10], num[10:]]
    else:
        parts = [num[i : i + 4] for i in range(0, n, 4)]
    return sep.join(parts)


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_BRANDS)
    num = _luhn_complete(prefix, length, rng)
    return _group_card(num, rng.choice([" ", " ", "-", ""]))


# Countries we plant, with a BBAN layout (L = letter, 9 = digit) approximating each country's.
_IBAN_LAYOUTS = {
    "DE": "999999999999999999",
    "GB": "LLLL99999999999999",
    "FR": "9999999999LLLLLLLLLLL99",
    "NL": "LLLL9999999999",
    "ES": "99999999999999999999",
    "IT": "L9999999999LLLLLLLLLLLL",
    "BE": "999999999999",
    "CH": "99999LLLLLLLLLLLL",
    "AT": "9999999999999999",
    "PL": "999999999999999999999999",
    "SE": "99999999999999999999",
    "NO": "99999999999",
    "IE": "LLLL99999999999999",
    "PT": "999999999999999999999",
    "SA": "99LLLLLLLLLLLLLLLLLL",
    "BR": "99999999999999999999999LL",
}


def _iban_compact(rng: random.Random, country: str | None = None) -> str:
    country = country or rng.choice(sorted(_IBAN_LAYOUTS))
    layout = _IBAN_LAYOUTS[country]
    bban = "".join(
        rng.choice(string.ascii_uppercase) if c == "L" else rng.choice(string.digits) for c in layout
    )
    assert len(country) + 2 + len(bban) == _IBAN_LENGTHS[country], country
    rearranged = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in rearranged)) % 97
    return f"{country}{check:02d}{bban}"


def _iban_print(compact: str) -> str:
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def _iban(rng: random.Random) -> str:
    compact = _iban_compact(rng)
    return _iban_print(compact) if rng.random() < 0.6 else compact


def _ssn(rng: random.Random) -> str:
    area = rng.choice([rng.randint(1, 665), rng.randint(667, 899)])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


_B64 = string.ascii_letters + string.digits + "+/"
_B64URL = string.ascii_letters + string.digits + "-_"


def _b64url(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()


def _jwt(rng: random.Random) -> str:
    header = _b64url({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"})
    payload = _b64url(
        {
            "sub": _digits(rng, 10),
            "name": " ".join(_name(rng)),
            "iat": rng.randint(1_600_000_000, 1_800_000_000),
        }
    )
    return f"{header}.{payload}.{_alnum(rng, 43, _B64URL)}"


def _pem(rng: random.Random, truncated: bool = False) -> str:
    label = rng.choice(
        ["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY"]
    )
    lines = [_alnum(rng, 64, _B64) for _ in range(rng.randint(3, 9))] + [
        _alnum(rng, rng.randint(20, 60), _B64) + "=="
    ]
    if truncated:
        return f"-----BEGIN {label}-----\n" + "\n".join(lines)
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


# Secret generators: (template around the value, value generator). `{}` marks where the gold span goes.
def _secret_parts(rng: random.Random) -> tuple[str, str, str]:
    """(text before, secret, text after): the gold span is the middle part."""
    up = string.ascii_uppercase + string.digits
    choice = rng.randrange(16)
    if choice == 0:
        return "", rng.choice(["AKIA", "ASIA"]) + _alnum(rng, 16, up), ""
    if choice == 1:
        name = rng.choice(["aws_secret_access_key = ", "AWS_SECRET_ACCESS_KEY=", '"SecretAccessKey": "'])
        return name, _alnum(rng, 40, _B64), '"' if name.endswith('"') else ""
    if choice == 2:
        return "", rng.choice(["ghp_", "gho_", "ghs_"]) + _alnum(rng, 36), ""
    if choice == 3:
        return "", "github_pat_" + _alnum(rng, 22) + "_" + _alnum(rng, 59), ""
    if choice == 4:
        tok = f"xox{rng.choice('bpa')}-{_digits(rng, 12)}-{_digits(rng, 13)}-{_alnum(rng, 24)}"
        return "", tok, ""
    if choice == 5:
        return (
            "",
            f"https://hooks.slack.com/services/T{_alnum(rng, 8, up)}/B{_alnum(rng, 9, up)}/{_alnum(rng, 24)}",
            "",
        )
    if choice == 6:
        return "", rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + _alnum(rng, 24), ""
    if choice == 7:
        return "", "AIza" + _alnum(rng, 35, _B64URL), ""
    if choice == 8:
        return "", rng.choice(["sk-", "sk-proj-", "sk-ant-api03-"]) + _alnum(rng, 48), ""
    if choice == 9:
        return "", _jwt(rng), ""
    if choice == 10:
        return (
            rng.choice(["Authorization: Bearer ", "authorization: bearer ", '-H "Authorization: Bearer ']),
            _alnum(rng, rng.randint(24, 48), string.ascii_letters + string.digits + "-._"),
            "",
        )
    if choice == 11:
        cred = base64.b64encode(f"{_name(rng)[0]}:{_alnum(rng, 12)}".encode()).decode()
        return "Authorization: Basic ", cred, ""
    if choice == 12:
        name = rng.choice(
            ['api_key = "', 'API_KEY="', "client_secret: '", '"password": "', "db_password = '"]
        )
        return name, _alnum(rng, rng.randint(16, 40)), name[-1]
    if choice == 13:
        return "", _pem(rng), ""
    if choice == 14:
        return "", _pem(rng, truncated=True), ""
    return "Authorization: Bearer ", _jwt(rng), ""


# --------------------------------------------------------------------------------------------------------
# look-alikes (not PII)


def _lookalike(rng: random.Random, what: str) -> str:
    d = lambda n: _digits(rng, n)  # noqa: E731
    y, mo, da = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    match what:
        case "version":
            return rng.choice(
                [
                    f"v{rng.randint(0, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 99)}",
                    f"v{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
                    f"version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 99)}",
                    f"10.0.{rng.randint(10000, 22631)}.{rng.randint(100, 3000)}",
                    f"=={rng.randint(1, 4)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
                ]
            )
        case "date":
            return rng.choice(
                [
                    f"{y}-{mo:02d}-{da:02d}",
                    f"{da:02d}/{mo:02d}/{y}",
                    f"{da:02d}.{mo:02d}.{y}",
                    f"{mo}/{da}/{y}",
                ]
            )
        case "time":
            return rng.choice(
                [
                    f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
                    f"{y}-{mo:02d}-{da:02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
                    f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                ]
            )
        case "order":
            return rng.choice(
                [
                    f"#{d(9)}",
                    f"Order No. {rng.randint(1, 9)}{d(9)}",
                    f"INV-{y}-{d(6)}",
                    f"PO {d(8)}",
                    f"ref {rng.randint(1, 9)}{d(11)}",
                ]
            )
        case "isbn":
            return rng.choice(
                [
                    f"978-{rng.randint(0, 9)}-{d(2)}-{d(6)}-{d(1)}",
                    f"0-{d(3)}-{d(5)}-{d(1)}",
                    f"ISBN 978{d(10)}",
                    f"979-{d(2)}-{d(4)}-{d(3)}-{d(1)}",
                ]
            )
        case "tracking":
            return rng.choice(
                [
                    f"1Z {_alnum(rng, 3, string.ascii_uppercase + string.digits)} {_alnum(rng, 3, string.ascii_uppercase + string.digits)} {d(2)} {d(4)} {d(4)}",
                    f"9400 {d(4)} {d(4)} {d(4)} {d(4)} {d(2)}",
                    f"JD{d(18)}",
                    f"{d(22)}",
                ]
            )
        case "sha":
            return "".join(rng.choice("0123456789abcdef") for _ in range(rng.choice([7, 40, 64])))
        case "uuid":
            h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        case "bad_card":
            prefix, length = rng.choice(_CARD_BRANDS)
            good = _luhn_complete(prefix, length, rng)
            bad = good[:-1] + str((int(good[-1]) + rng.randint(1, 9)) % 10)
            if rng.random() < 0.3:  # valid Luhn but no known issuer prefix
                bad = _luhn_complete(rng.choice(["1", "7", "8", "9"]), 16, rng)
            return _group_card(bad, rng.choice([" ", "-", ""]))
        case "imei":
            return "IMEI " + _luhn_complete("35" + d(6), 15, rng)
        case "bad_iban":
            compact = _iban_compact(rng)
            i = rng.randrange(4, len(compact))
            if compact[i].isdigit():
                compact = compact[:i] + str((int(compact[i]) + rng.randint(1, 9)) % 10) + compact[i + 1 :]
            else:
                compact = compact[:2] + f"{(int(compact[2:4]) + 1) % 100:02d}" + compact[4:]
            if rng.random() < 0.2:
                compact = "XK" + compact[2:] if False else "ZZ" + compact[2:]
            return _iban_print(compact) if rng.random() < 0.5 else compact
        case "vat":
            return rng.choice([f"DE{d(9)}", f"GB{d(9)}", f"FR{d(11)}", "BIC COBADEFFXXX", "SWIFT DEUTDEFF"])
        case "bad_ssn":
            return rng.choice(
                [
                    f"000-{d(2)}-{d(4)}",
                    f"666-{rng.randint(10, 99)}-{d(4)}",
                    f"9{d(2)}-{rng.randint(10, 99)}-{d(4)}",
                    f"{rng.randint(100, 665)}-00-{d(4)}",
                    f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-0000",
                    f"{rng.randint(100, 665)} {rng.randint(10, 99)} {d(4)}",
                    f"{rng.randint(100, 665)}{rng.randint(10, 99)}{d(4)}",
                ]
            )
        case "private_ip":
            return rng.choice(
                [
                    f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    "127.0.0.1",
                    "0.0.0.0",
                    "255.255.255.0",
                    f"169.254.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    f"192.0.2.{rng.randint(1, 254)}",
                    f"203.0.113.{rng.randint(1, 254)}",
                    f"100.{rng.randint(64, 127)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    f"1.3.6.1.4.1.{rng.randint(100, 99999)}",
                    f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
                    f"1.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
                ]
            )
        case "private_ip6":
            return rng.choice(
                [
                    "::1",
                    "::",
                    f"fe80::{rng.randint(1, 0xFFFF):x}:{rng.randint(1, 0xFFFF):x}:{rng.randint(1, 0xFFFF):x}",
                    f"fd{rng.randint(0, 255):02x}:{rng.randint(0, 0xFFFF):x}::{rng.randint(1, 0xFFFF):x}",
                    f"2001:db8::{rng.randint(1, 0xFFFF):x}",
                    "ff02::1",
                    f"2001:db8:85a3::8a2e:370:{rng.randint(1, 0xFFFF):x}",
                ]
            )
        case "mac":
            return rng.choice([":", "-"]).join(f"{rng.randint(0, 255):02X}" for _ in range(6))
        case "scope":
            return rng.choice(
                ["std::vector<int>", "Foo::Bar", "Base::add()", "std::map", "crate::cafe::face()", "a::b"]
            )
        case "decorator":
            return rng.choice(
                [
                    "@property",
                    "@app.route('/')",
                    "@dataclass(frozen=True)",
                    "@pytest.fixture",
                    "@staticmethod",
                ]
            )
        case "handle":
            return rng.choice(
                [f"@{_name(rng)[0]}", f"@{_name(rng)[0]}_{_name(rng)[1]}", "@types/node", "@babel/core"]
            )
        case "asset":
            return rng.choice(
                [
                    f"icon@{rng.randint(2, 3)}x.png",
                    f"logo@{rng.randint(2, 3)}x.webp",
                    "hero@1.5x.jpg",
                    f"lodash@4.17.{rng.randint(10, 21)}",
                    f"{_name(rng)[0]}@localhost",
                    "admin@server",
                    f"react@{rng.randint(16, 18)}.2.0",
                ]
            )
        case "price":
            return rng.choice(
                [
                    f"${rng.randint(1, 9)},{d(3)}.{d(2)}",
                    f"€{rng.randint(1, 999)},{d(2)}",
                    f"USD {rng.randint(100, 99999)}.{d(2)}",
                    f"£{rng.randint(1, 99)}.{d(2)}",
                ]
            )
        case "product":
            return rng.choice(
                [
                    f"SKU {rng.randint(1, 9)}{d(12)}",
                    f"EAN 40{d(11)}",
                    f"Model {d(10)}",
                    f"P/N {d(4)}-{d(4)}-{d(2)}",
                    f"SN: {_alnum(rng, 4, string.ascii_uppercase + string.digits)}-{d(4)}-{d(4)}",
                ]
            )
        case "timestamp":
            return rng.choice(
                [
                    str(rng.randint(1_400_000_000, 1_800_000_000)),
                    str(rng.randint(1_400_000_000_000, 1_800_000_000_000)),
                ]
            )
        case "number":
            return rng.choice(
                [
                    f"{rng.randint(1, 999)},{d(3)},{d(3)}",
                    f"{rng.randint(1, 99)} {d(3)} {d(3)}",
                    f"{rng.randint(1990, 2030)}-{rng.randint(1990, 2030)}",
                    f"{rng.randint(10000, 99999)}-{d(4)}",
                    f"{rng.randint(1, 90)}.{d(4)}, -{rng.randint(1, 170)}.{d(4)}",
                    f"{d(3)}.{d(3)}.{d(3)}",
                ]
            )
        case "not_secret":
            return rng.choice(
                [
                    "sk-learn",
                    "the bearer of this card",
                    'api_key = os.environ["API_KEY"]',
                    'password = "changeme"',
                    'token: "YOUR_TOKEN_HERE"',
                    "Authorization: Bearer $TOKEN",
                    'api_key = "${API_KEY}"',
                    "AKIA prefix",
                    f"sha256:{''.join(rng.choice('0123456789abcdef') for _ in range(64))}",
                    f"sha384-{_alnum(rng, 64, _B64)}",
                    "-----BEGIN PUBLIC KEY-----\n"
                    + "\n".join(_alnum(rng, 64, _B64) for _ in range(3))
                    + "\n-----END PUBLIC KEY-----",
                    "-----BEGIN CERTIFICATE-----\n"
                    + "\n".join(_alnum(rng, 64, _B64) for _ in range(3))
                    + "\n-----END CERTIFICATE-----",
                    'password: "<your password>"',
                    "ghp_ prefix tokens",
                ]
            )
    raise KeyError(what)


_LOOKALIKES = [
    "version",
    "date",
    "time",
    "order",
    "isbn",
    "tracking",
    "sha",
    "uuid",
    "bad_card",
    "imei",
    "bad_iban",
    "vat",
    "bad_ssn",
    "private_ip",
    "private_ip6",
    "mac",
    "scope",
    "decorator",
    "handle",
    "asset",
    "price",
    "product",
    "timestamp",
    "number",
    "not_secret",
]


# --------------------------------------------------------------------------------------------------------
# document templates: `{EMAIL}`-style upper-case slots plant PII, lower-case slots plant look-alikes,
# `{n}`/`{w}`/`{name}` are neutral filler.

_FILLER = (
    "We shipped {n} orders last quarter and the {w} team grew to {n} people.",
    "The {w} job finished in {n}.{n} seconds after the {w} was warmed up.",
    "Thanks {name}, that fixed it for me on {date}.",
    "Doors open at {time}; the talk starts fifteen minutes later.",
    "Prices start at {price} including VAT.",
    "See chapter {n} for the details of the {w} design.",
    "Our {w} handled {number} requests during the sale.",
    "Upgrade to {version} before the {w} migration.",
    "Reference: {order}. Please keep it for your records.",
    "The book ({isbn}) covers the {w} in depth.",
    "Your parcel {tracking} is out for delivery.",
    "Fixed in commit {sha}.",
    "Request id {uuid} was retried {n} times.",
    "Item {product} is back in stock.",
    "Logged at {timestamp} by the {w} service.",
)

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "web": (
        "Contact our {w} desk at {EMAIL} or call {PHONE} (Mon–Fri, 9:00–17:00).",
        "For press enquiries write to <{EMAIL}>.",
        "Questions? Email {EMAIL}, phone {PHONE}.",
        "Head office: 221B Baker Street, London. Tel. {PHONE}, fax {PHONE}.",
        "Send your CV to {EMAIL}; we reply within {n} days.",
        "Our European office can be reached on {PHONE}.",
        "Bank transfer: IBAN {IBAN}, reference {order}.",
        "Please pay into {IBAN} (account holder: {name}).",
        "Built with {asset} and {handle} components, served from {private_ip}.",
        "Follow us {handle} for {w} news; app icons: {asset}.",
        "The site moved to {IPV4} on {date}.",
        "Our new anycast address is {IPV6}.",
        "Donations: {IBAN}. Thank you!",
        "Call us toll free at {PHONE}. Outside the US dial {PHONE}.",
    ),
    "forum": (
        "hey all, my router keeps handing out {private_ip} but the WAN side shows {IPV4}. any idea?",
        "Posted by {name} on {date} at {time}: just email me at {EMAIL} and I'll send the {w} logs.",
        "lol my card {CARD} got declined again, bank says call {PHONE}",
        "PSA: never post your SSN ({SSN}) in a public thread, I had to ask a mod to delete mine.",
        "My SSN is {SSN} and my card is {CARD}, is this form legit??",
        "i tried {version} and {version}, still broken. log says {time}",
        "my ipv6 is {IPV6} and ping to {IPV6} works but {private_ip6} doesn't",
        "dm me {handle} or mail {EMAIL}",
        "whoever wrote {scope} in the docs should fix the example, also {decorator} is missing",
        "I accidentally committed my key {SECRET} to github, how do I rotate it?",
        "test card {bad_card} fails Luhn, obviously. Real one ends in 1234.",
        "MAC {mac} keeps getting a new lease every {n} minutes",
        "reach me at +{n}? no wait, use {PHONE} instead",
        "the ISBN is {isbn}, costs {price}",
    ),
    "invoice": (
        "INVOICE {order}\nDate: {date}\nBill to: {name}, {EMAIL}, {PHONE}",
        "Card: {CARD}  Exp 12/{n}  Amount: {price}",
        "Card number: {CARD}\nAuthorised on {date} at {time}",
        "Pay by transfer to IBAN: {IBAN} BIC COBADEFFXXX\nVAT: {vat}",
        "Beneficiary IBAN {IBAN}; do not use the old account {bad_iban}.",
        "Customer SSN: {SSN}\nCustomer ref: {order}",
        "Social Security Number: {SSN}",
        "Item {product}  qty {n}  {price}",
        "Ship to {name}, phone {PHONE}. Tracking: {tracking}",
        "Declined card {bad_card} (invalid number)",
        "Tax id {bad_ssn} was rejected by the validator.",
        "Device {imei} registered to order {order}.",
    ),
    "log": (
        '{IPV4} - - [05/Oct/2023:{time} +0000] "GET /{w}/{n} HTTP/1.1" 200 {n} "-" "Mozilla/5.0"',
        "{date} {time} sshd[{n}]: Failed password for root from {IPV4} port {n} ssh2",
        "{date} {time} WARN upstream {IPV6} timed out after {n}ms (local {private_ip})",
        "{date}T{time} INFO client=[{IPV6}]:443 user={EMAIL} status=ok",
        "{date} {time} DEBUG connecting to {private_ip}:{n} from {private_ip6}",
        "{date} {time} ERROR request {uuid} from {IPV4}:{n} failed: {w} unavailable",
        "{time} kernel: eth0 link up, MAC {mac}, build {version}",
        "{date} {time} INFO job {sha} done in {n}.{n}s",
        "{date} {time} AUDIT login user={EMAIL} ip={IPV4}",
        "{date} {time} WARN leaked credential detected: {SECRET}",
    ),
    "code": (
        "{decorator}\ndef {w}(self):\n    return self._{w}  # see {scope}",
        'requests.get(url, headers={{"Authorization": "Bearer {BEARER}"}})',
        "client = boto3.client('s3', aws_access_key_id='{AWS_ID}')",
        "export GITHUB_TOKEN={SECRET}",
        "# contact: {EMAIL}\nimport {w}  # requires {w} {version}",
        "{not_secret}\nprint('{w}')",
        "const key = '{SECRET}';",
        "curl -H 'Authorization: Bearer {BEARER}' https://api.{w}.com/v1/{w}",
        "{PEM}",
        "assert parse('{date}') == {n}\nassert ip == '{private_ip}'",
        "# {not_secret}\nuuid = '{uuid}'",
        "db.connect(host='{IPV4}', password='{PASSWORD}')",
    ),
    "config": (
        "AWS_ACCESS_KEY_ID={AWS_ID}\naws_secret_access_key = {AWS_SECRET}",
        "SLACK_TOKEN={SECRET}\nLOG_LEVEL=info",
        'api_key = "{APIKEY}"\ntimeout = {n}',
        '[smtp]\nhost = {IPV4}\nuser = {EMAIL}\npassword = "{PASSWORD}"',
        'listen: {private_ip}:{n}\nupstream: "{IPV6}"',
        "version: {version}\nbuild: {sha}",
        'admin_email: {EMAIL}\nsupport_phone: "{PHONE}"',
        "OPENAI_API_KEY={SECRET}",
        "{not_secret}\nretries: {n}",
        "private_key: |\n{PEM}",
        "resolver {IPV6} {IPV4};",
        "jwt: {JWT}",
    ),
}

_SECRET_SLOTS = {"SECRET", "BEARER", "AWS_ID", "AWS_SECRET", "APIKEY", "PASSWORD", "PEM", "JWT"}
_KIND_OF_SLOT = {
    "EMAIL": "email",
    "PHONE": "phone",
    "IPV4": "ipv4",
    "IPV6": "ipv6",
    "CARD": "credit_card",
    "IBAN": "iban",
    "SSN": "ssn",
} | dict.fromkeys(_SECRET_SLOTS, "secret")
_SLOT = re.compile(r"\{\{|\}\}|\{(\w+)\}")


def _plant(rng: random.Random, slot: str) -> tuple[str, str, str]:
    """(prefix, gold text, suffix) for a PII slot."""
    up = string.ascii_uppercase + string.digits
    match slot:
        case "EMAIL":
            return "", _email(rng), ""
        case "PHONE":
            return "", _phone(rng), ""
        case "IPV4":
            return "", _ipv4(rng), ""
        case "IPV6":
            return "", _ipv6(rng), ""
        case "CARD":
            return "", _card(rng), ""
        case "IBAN":
            return "", _iban(rng), ""
        case "SSN":
            return "", _ssn(rng), ""
        case "SECRET":
            return _secret_parts(rng)
        case "BEARER":
            return "", _alnum(rng, rng.randint(24, 48), string.ascii_letters + string.digits + "-._"), ""
        case "AWS_ID":
            return "", rng.choice(["AKIA", "ASIA"]) + _alnum(rng, 16, up), ""
        case "AWS_SECRET":
            return "", _alnum(rng, 40, _B64), ""
        case "APIKEY" | "PASSWORD":
            return "", _alnum(rng, rng.randint(12, 40), string.ascii_letters + string.digits + "!#%*_-"), ""
        case "PEM":
            return "", _pem(rng), ""
        case "JWT":
            return "", _jwt(rng), ""
    raise KeyError(slot)


def _render(rng: random.Random, template: str, text: list[str], spans: list[tuple[str, int, int]]) -> int:
    """Append ``template`` with its slots filled to ``text``; return how many look-alikes it planted."""
    pos = sum(map(len, text))
    looks = 0
    last = 0
    for m in _SLOT.finditer(template):
        chunk = template[last : m.start()]
        text.append(chunk)
        pos += len(chunk)
        last = m.end()
        slot = m.group(1)
        if slot is None:  # `{{` / `}}` escapes
            text.append(m.group()[0])
            pos += 1
            continue
        if slot in _KIND_OF_SLOT:
            before, gold, after = _plant(rng, slot)
            text.append(before)
            pos += len(before)
            spans.append((_KIND_OF_SLOT[slot], pos, pos + len(gold)))
            value = gold + after
        elif slot == "n":
            value = str(rng.randint(2, 500))
        elif slot == "w":
            value = rng.choice(_WORDS)
        elif slot == "name":
            value = " ".join(x.capitalize() for x in _name(rng))
        else:
            value = _lookalike(rng, slot)
            looks += 1
        text.append(value)
        pos += len(value)
    text.append(template[last:])
    return looks


def generate(seed: int = 0, n_docs: int = 1500, min_per_kind: int = 300) -> list[LabelledDoc]:
    """Deterministic labelled documents: at least ``n_docs``, and more until every kind has ``min_per_kind``."""
    rng = random.Random(seed)
    docs: list[LabelledDoc] = []
    support = dict.fromkeys(KINDS, 0)
    doc_types = sorted(_TEMPLATES)
    while len(docs) < n_docs or min(support.values()) < min_per_kind:
        doc_type = rng.choice(doc_types)
        text: list[str] = []
        spans: list[tuple[str, int, int]] = []
        looks = 0
        for i in range(rng.randint(3, 8)):
            if i:
                text.append(
                    "\n" if doc_type in ("log", "code", "config", "invoice") else rng.choice([" ", "\n\n"])
                )
            pool = _FILLER if rng.random() < 0.35 else _TEMPLATES[doc_type]
            looks += _render(rng, rng.choice(pool), text, spans)
        doc = LabelledDoc("".join(text), tuple(spans), doc_type, looks)
        for kind, _, _ in doc.spans:
            support[kind] += 1
        docs.append(doc)
    return docs


# --------------------------------------------------------------------------------------------------------
# scoring


@dataclass
class _Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    errors: list[str] = field(default_factory=list)


def score(
    docs: list[LabelledDoc],
    detector: Callable[[str], list[PIIMatch]] = find_pii,
    max_errors: int = 20,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per-kind precision/recall/F1/support under exact span matching, plus example errors for debugging."""
    tallies = {k: _Tally() for k in KINDS}
    for doc in docs:
        gold = set(doc.spans)
        pred = {(m.kind, m.start, m.end) for m in detector(doc.text)}
        for kind, s, e in pred:
            t = tallies[kind]
            if (kind, s, e) in gold:
                t.tp += 1
            else:
                t.fp += 1
                if len(t.errors) < max_errors:
                    t.errors.append(
                        f"FP {kind}: {doc.text[s:e]!r} in …{doc.text[max(0, s - 40) : e + 40]!r}…"
                    )
        for kind, s, e in gold - pred:
            t = tallies[kind]
            t.fn += 1
            if len(t.errors) < max_errors:
                t.errors.append(f"FN {kind}: {doc.text[s:e]!r} in …{doc.text[max(0, s - 40) : e + 40]!r}…")
    scores: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    for kind, t in tallies.items():
        p = t.tp / (t.tp + t.fp) if t.tp + t.fp else 1.0
        r = t.tp / (t.tp + t.fn) if t.tp + t.fn else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        scores[kind] = {"precision": p, "recall": r, "f1": f1, "support": t.tp + t.fn}
        errors.extend(t.errors)
    return scores, errors


def evaluate(seed: int = 0, n_docs: int = 1500, min_per_kind: int = 300) -> dict[str, dict[str, float]]:
    """Generate the labelled set for ``seed`` and score ``find_pii`` on it, per kind."""
    return score(generate(seed, n_docs, min_per_kind))[0]


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """A Markdown table of ``evaluate()`` output (for the data report and the test log)."""
    lines = ["| kind | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for kind, s in scores.items():
        lines.append(
            f"| {kind} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {int(s['support'])} |"
        )
    return "\n".join(lines)
