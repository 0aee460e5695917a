"""Detect and scrub personal data and secrets in text.

One library, two callers: the data stage (``llmforge data process`` scrubs every document) and the serving
safety filter (scans prompts and outputs). Both go through ``find_pii`` / ``scrub`` / ``PIIScrubber``.

Kinds and what each detector accepts (``KINDS``; placeholders in ``PLACEHOLDERS``):

* ``email``       — ``local@domain.tld``: plus-addressing, sub-domains, unicode / ``xn--`` domains. Not
  ``user@localhost`` (no dot), not ``@handles`` / decorators (no local part), not ``icon@2x.png`` assets,
  not ``pkg@1.2.3`` (numeric "TLD"), not URL userinfo (``https://key@o1.sentry.io``) or scp/ssh targets
  (``git@github.com:org/repo.git``). Inside ``<…>`` the rarer RFC 5322 characters are accepted, so VERP/SRS
  bounce addresses (``<bounce-1-user=corp.com@mailer.net>``) match whole.
* ``phone``       — international (``+44 20 7946 0958``, ``+14155552671``, ``0044 …``), North American
  (``(555) 123-4567``, ``555.123.4567``, ``1-800-555-0199``) and trunk-0 national numbers
  (``020 7946 0958``, ``06 12 34 56 78``). A number must *look* like a phone: a ``+``/``00`` prefix, or the
  3-3-4 NANP grouping, or a leading 0 with at least two groups of ≥ 2 digits. Plain digit runs (order ids,
  timestamps, EANs), dates, versions, ISBNs, numbers glued to words, ``#``, ``/`` or ``.``, numbers after a
  label such as ``SKU``/``P/N``/``Order no.``, and digits continuing a code (``1Z 21L YG6 06 3969 6871``)
  are rejected. Without a trunk 0 we also accept a parenthesised 2-digit area code (Brazil/Mexico
  ``(11) 91234-5678``), Australian ``1300``/``1800`` numbers, and an unformatted 10–11 digit run right after
  a phone label (``Tel:``, ``my cell is``, ``contact no.``).
* ``ipv4`` / ``ipv6`` — globally routable addresses only (``ipaddress.is_global``; for IPv6 also inside
  2000::/3, the only block handed out as global unicast, which rejects hex words such as ``cafe::face``):
  private, loopback, link-local, multicast, reserved and documentation ranges are not personal data.
  ``::ffff:a.b.c.d`` is judged by its IPv4 address. Dotted quads that follow ``v``/``version``/``==``/
  ``section``/``§`` or a ``product/`` token are versions, and so is the quad joined to one by ``to``/``-``/``,``
  (``from version 2.1.0.15 to 2.1.0.17``). MAC addresses are *not* reported: they identify devices rather than
  people in web text, and their ``aa:bb:cc:dd:ee:ff`` shape is shared by hex dumps and serials.
* ``credit_card`` — 13–19 digits, plain or grouped with one consistent space/dash separator (4-4-4-4[-3],
  Amex 4-6-5, Diners 4-6-4), a known issuer prefix with its allowed lengths, and a valid Luhn check digit.
  13-digit Visa numbers are not accepted: they are retired and collide with EAN-13 barcodes.
* ``iban``        — country code from the registry table, exact country length, mod-97 checksum; printed
  (groups of 4) or electronic form. Upper-case only, as printed by banks.
* ``ssn``         — US ``AAA-GG-SSSS``; area 000/666/9xx, group 00 and serial 0000 are invalid and skipped.
  Space-separated or unseparated forms count only after an ``SSN``/``social security`` label.
* ``secret``      — AWS access key ids (``AKIA``/``ASIA``), AWS secret keys next to their name, GitHub
  (``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``/``github_pat_``), Slack (``xox?-`` tokens, webhook URLs),
  Stripe (``sk_live_``/``rk_live_``/``sk_test_``), Google (``AIza…``) and OpenAI/Anthropic-style (``sk-…``)
  keys, JWTs, ``Bearer …`` / ``Authorization: Basic|Token …`` values (only the value is redacted, so the
  text reads ``Authorization: Bearer <SECRET>``), quoted values assigned to identifiers ending in a
  credential name (``api_key``, ``db_password``, ``client_secret``, ``auth_token`` …; placeholders like
  ``YOUR_API_KEY`` or ``${VAR}`` are skipped), and whole PEM ``PRIVATE KEY`` blocks (to the END line, or
  to the end of the base64 body when the block is truncated), and passwords in URL userinfo
  (``postgres://app:<SECRET>@db/prod``). Public keys and certificates are not secrets; documentation fillers
  with a run of 8 identical characters (``ghp_xxxx…``, ``T00000000``) are skipped.

Overlaps are resolved by priority (``secret > email > iban > credit_card > ssn > ipv6 > ipv4 > phone``), then
by the longer span, so one character is never claimed twice.

Speed: every detector has a cheap pre-check — ``str.find('@')`` for e-mails, one C-level pass for numeric
clusters (≥ 8 digits or a dotted quad) that the phone/card/SSN/IPv4 regexes then scan instead of the whole
text, one pass for all secrets' literal hints — and the regexes begin with a character class or literal so
the engine skips ahead in C. The Python-level validators (Luhn, mod-97, ``ipaddress``) only see candidates.
Regexes are module-level, so a ``PIIScrubber`` pickles as just its action table.

Idempotence: boundary checks treat ``<`` and ``>`` as glue, so a placeholder next to a number does not turn a
rejected neighbour into a match on the second pass; ``scrub(scrub(x).text) == scrub(x).text``.
"""

from __future__ import annotations

import base64
import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from llmforge.errors import UserInputError

__all__ = ["ACTIONS", "KINDS", "PLACEHOLDERS", "PIIMatch", "PIIScrubber", "ScrubResult", "find_pii", "scrub"]

KINDS: tuple[str, ...] = ("email", "phone", "ipv4", "ipv6", "credit_card", "iban", "ssn", "secret")
PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ipv4": "<IP_ADDRESS>",
    "ipv6": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "iban": "<IBAN>",
    "ssn": "<SSN>",
    "secret": "<SECRET>",
}
ACTIONS: tuple[str, ...] = ("redact", "drop-document", "keep")

# Lower rank wins an overlap. Secrets first: a key often contains digit runs or '@' that other detectors see.
_PRIORITY: tuple[str, ...] = ("secret", "email", "iban", "credit_card", "ssn", "ipv6", "ipv4", "phone")
_RANK: dict[str, int] = {k: i for i, k in enumerate(_PRIORITY)}


@dataclass(frozen=True, slots=True)
class PIIMatch:
    """One detected span: ``text[start:end] == match.text``."""

    kind: str
    start: int
    end: int
    text: str


@dataclass
class ScrubResult:
    """Outcome of scrubbing one text.

    ``counts`` holds matches found per kind (only kinds whose action is not ``keep``, only non-zero).
    ``drop`` is true when a ``drop-document`` kind was found; ``drop_kinds`` lists those kinds in ``KINDS``
    order. ``text`` has the ``redact`` kinds replaced even when ``drop`` is set.
    """

    text: str
    counts: dict[str, int] = field(default_factory=dict)
    drop: bool = False
    drop_kinds: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# helpers

_DIGITS = "0123456789"


def _iter_regions(pattern: re.Pattern[str], scan: _Scan) -> Iterator[re.Match[str]]:
    """``pattern.finditer`` restricted to the numeric clusters of ``scan.text`` (see ``_Scan``)."""
    text = scan.text
    last = -1
    for pos, stop, endpos in scan.regions:
        for m in pattern.finditer(text, pos, endpos):
            if m.start() >= stop:
                # A match starting in the padding is a truncated prefix of the *next* cluster (`…6789; 022-…`):
                # yielding it would shadow that cluster's real match.
                break
            if m.start() >= last:  # padded regions can touch; never yield a span twice
                last = m.end()
                yield m


def _glued(ch: str) -> bool:
    """True when ``ch`` would make a neighbouring number part of a larger token (word, id, placeholder)."""
    return ch.isalnum() or ch in "_<>"


# --------------------------------------------------------------------------------------------------------
# email

# Local-part characters we accept (RFC 5322 allows more, but !#$&*/=?^`{|}~ almost never occur in real
# addresses and would let code such as `a=b@c.io` leak into the match).
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_EMAIL_DOMAIN = re.compile(
    r"((?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+)"  # labels: letters/digits/hyphens (unicode ok), no edge hyphen
    r"([^\W\d_]{2,63}|xn--[a-z0-9-]{1,59})"  # TLD: letters (incl. IDN) or punycode
    r"(?![\w-])",
    re.I,  # only matters for the `xn--` TLD alternative; the classes are case-free
)
# `@2x.png`-style asset names and `name@file.ext` references: a file extension is not a TLD we accept.
# fmt: off
_ASSET_TLDS = frozenset({
    "png", "jpg", "jpeg", "gif", "svg", "webp", "avif", "ico", "bmp", "tif", "tiff", "css", "js", "mjs",
    "map", "json", "html", "htm", "woff", "woff2", "ttf", "otf", "eot", "mp4", "webm", "mp3", "wav", "ogg",
    "pdf", "txt", "md", "py", "rb",
})
# fmt: on
_RETINA = re.compile(r"\d+(?:\.\d+)?x\.", re.I)


def _find_email(text: str, _: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    at = text.find("@")
    n = len(text)
    while at != -1:
        start = at
        # Walk left over local-part characters (bounded: RFC 5321 caps the local part at 64).
        while (
            start > 0 and at - start < 64 and (text[start - 1] in _EMAIL_LOCAL or text[start - 1].isalnum())
        ):
            start -= 1
        while start < at and text[start] in ".-+":  # `..john@` / `-john@`: edges are punctuation, not address
            start += 1
        nxt = at + 1
        if start < at and text[at - 1] != "." and ".." not in text[start:at] and nxt < n:
            m = _EMAIL_DOMAIN.match(text, nxt)
            if (
                m
                and _email_domain_ok(m.group(1), m.group(2))
                and (start == 0 or not _glued_left(text[start - 1]))
                and not _url_userinfo(text, start)
                and not _scp_target(text, m.end())
            ):
                if m.end() < n and text[m.end()] == ">":
                    start = _bracketed_start(text, start, at)
                out.append((start, m.end()))
                nxt = m.end()
        at = text.find("@", nxt)
    return out


_USERINFO_BEFORE = re.compile(r"://(?:[^\s/@:]*:)?\Z")


# Inside `<…>` (mail headers, MTA logs) the address is explicitly delimited, so the rarer RFC 5322 local-part
# characters are safe there: VERP/SRS bounce addresses such as `<bounce-12-user=corp.com@mailer.net>`.
_EMAIL_ATEXT = _EMAIL_LOCAL | frozenset("!#$&'*/=?^`{|}~")


def _bracketed_start(text: str, start: int, at: int) -> int:
    i = start
    while i > 0 and at - i < 64 and text[i - 1] in _EMAIL_ATEXT:
        i -= 1
    return i if i < start and i > 0 and text[i - 1] == "<" else start


def _url_userinfo(text: str, start: int) -> bool:
    """`https://key@o1.ingest.sentry.io`, `https://user:pw@host.org`: the userinfo of a URL, not a mailbox."""
    return start >= 3 and _USERINFO_BEFORE.search(text, max(0, start - 80), start) is not None


def _scp_target(text: str, end: int) -> bool:
    """`git@github.com:org/repo.git`, `deploy@host.example.com:/srv`: an scp/ssh target, not an address."""
    return end + 1 < len(text) and text[end] == ":" and (text[end + 1].isalnum() or text[end + 1] in "/~")


def _glued_left(ch: str) -> bool:
    # An address right after '<' is normal (`<john@x.com>`); after '>' it may be a placeholder we wrote.
    return ch == ">" or ch == "_"


def _email_domain_ok(labels: str, tld: str) -> bool:
    if tld.lower() in _ASSET_TLDS:
        return False
    return not _RETINA.match(labels)


# --------------------------------------------------------------------------------------------------------
# phone

_SP = "[ \u00a0]"
_PHONE_RUN = re.compile(
    # Starts with a digit so the regex engine can skip ahead in C; a leading '+', '00' or '(' is taken in
    # Python. The lookbehind rejects numbers glued to words, ids (#), paths (/), versions (.) and prices.
    r"\d(?<![\w#/.@$£€¥<>\-]\d)\d*+"
    r"(?:(?:"
    + _SP
    + r"?[.\-]"
    + _SP
    + r"?|"
    + _SP
    + r"|"
    + _SP
    + r"?/"
    + _SP
    + r"?|"
    + _SP
    + r"?\(\d{1,5}\)"
    + _SP
    + r"?|\)"
    + _SP
    + r"?)"
    r"\d++)*+"
)
_DATE_PREFIX = re.compile(r"\(?(?:\d{4}[./\-]\d{1,2}[./\-]\d{1,2}|\d{1,2}[./\-]\d{1,2}[./\-]\d{4})(?!\d)")
_DIGIT_GROUPS = re.compile(r"\d+")
_NOT_PHONE_LABEL = re.compile(
    r"(?:\bsku|\bp/n|\bpart(?: no\.?| number)?|\bmodel|\bserial(?: no\.?)?|\bs/n|\bsn|\border(?: no\.?| id)?|"
    r"\binvoice(?: no\.?)?|\bref\.?|\bid|\bisbn(?:-1[03])?|\bean|\bupc|\bgtin|\bitem|\bart(?:\.|icle)?(?:-?nr\.?)?|"
    r"\btracking(?: no\.?| number)?|\bimei|\bbuild|\bversion|\bno\.)[ \t]*[:#.]?[ \t]*\Z",
    re.I,
)
# Digits that continue a code: right after a letters+digits token (`1Z 21L YG6 06 3969 6871`), or after an
# IBAN-shaped start (`NL88 JQBT 0898 9479 02`, checksum-invalid so the IBAN detector left it).
_CODE_BEFORE = re.compile(
    r"(?:\b(?=[A-Z0-9]*[A-Z])(?=[A-Z0-9]*\d)[A-Z0-9]+|\b[A-Z]{2}\d\d(?: [A-Z0-9]{4})+) \Z"
)


def _code_before(text: str, start: int) -> bool:
    """`ZZ20 4251 5889 …`: digits right after a code token belong to that code, not to a card or phone."""
    return _CODE_BEFORE.search(text, max(0, start - 40), start) is not None


# A label that says the next number is a phone (`Tel:`, `my cell is`, `contact no.`): trusted for unformatted
# digit runs (`4155550173`) that carry no phone shape of their own.
_PHONE_LABEL = re.compile(
    r"(?:\b(?:tel(?:ephone)?|phone|ph|mob(?:ile)?|cell(?:phone)?|handy|whats[ -]?app|fax|call|text|sms)"
    r"|\bcontact(?: no\.?| number| #)?)"
    r"(?:[ \t]+(?:no\.?|number|#))?(?:[ \t]+(?:is|me|us|at|on)){0,2}[ \t]*[:#.]?[ \t]*\Z",
    re.I,
)


def _find_phone(text: str, scan: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    n = len(text)
    for m in _iter_regions(_PHONE_RUN, scan):
        start, end = m.span()
        intl = False
        if start > 0 and text[start - 1] == "+":
            start -= 1
            intl = True
        if start > 0 and text[start - 1] == "(":
            start -= 1
        cand = text[start:end]
        if cand.count("(") != cand.count(")"):
            if cand[0] == "(":  # `(555-123-4567`: the parenthesis opens a remark, not an area code
                start += 1
                cand = cand[1:]
            if cand.count("(") != cand.count(")"):
                continue  # `1) 555-…` list markers, stray parentheses
        if start > 0:
            before = text[start - 1]
            if _glued(before) or before in "+#/.@$£€¥-":
                continue
            if before in ":," and start > 1 and text[start - 2].isdigit():
                continue  # `12:555…` times, `1,234,567` thousands
        if end < n:
            after = text[end]
            if _glued(after) or after in "@%":
                continue
            if after in ":,.-/" and end + 1 < n and text[end + 1].isalnum():
                continue  # `…19-03-CC` MAC tails, `…:30` times, `,5` decimals: part of a longer token
        if _DATE_PREFIX.match(cand.lstrip("+")):
            continue
        # Shape first (cheap), then the context look-backs.
        groups = _DIGIT_GROUPS.findall(cand)
        if not _phone_ok(groups, intl, cand):
            if not _labelled_phone(groups, intl) or not _PHONE_LABEL.search(text, max(0, start - 24), start):
                continue
        elif _NOT_PHONE_LABEL.search(text, max(0, start - 24), start):
            continue  # `P/N 0931-0152-34`, `Order no. 020 …`: a labelled code, whatever its shape
        if _CODE_BEFORE.search(text, max(0, start - 40), start):
            continue  # `1Z 21L YG6 06 3969 6871`: the tail of a tracking or serial code
        out.append((start, end))
    return out


def _labelled_phone(groups: list[str], intl: bool) -> bool:
    """Digit count of a national number written as one run (`4155550173`, `9876543210`) after a phone label."""
    nd = sum(len(g) for g in groups)
    return not intl and len(groups) == 1 and 10 <= nd <= 11


def _phone_ok(groups: list[str], intl: bool, cand: str) -> bool:
    digits = "".join(groups)
    sep_chars = set(cand) - set(_DIGITS)
    if not intl and groups[0].startswith("00") and len(groups) > 1:
        intl, digits = True, digits[2:]  # `0044 20 7946 0958`: 00 is the international call prefix
    nd = len(digits)
    if intl:
        # E.164 allows at most 15 digits; a bare `+12345678` is more likely a signed count than a phone.
        return 8 <= nd <= 15 and digits[0] != "0" and (len(groups) > 1 or nd >= 10)
    lens = [len(g) for g in groups]
    if groups[0] == "1" and len(groups) == 4:  # `1-800-555-0199`
        lens = lens[1:]
        digits = digits[1:]
    if cand[0] == "(" and lens in ([2, 4, 4], [2, 5, 4]) and digits[0] != "0" and cand[3] == ")":
        # Two-digit area code in parentheses without a trunk 0: Brazil `(11) 91234-5678`, Mexico
        # `(55) 1234 5678`, Argentina.
        return True
    if lens == [4, 3, 3] and digits[:4] in ("1300", "1800"):
        return True  # Australian local-rate / toll-free `1300 123 456`
    if lens == [3, 3, 4] and digits[0] != "0":
        # NANP: an area code never starts with 0 or 1. (Exchanges cannot either, but fictional numbers such
        # as `(555) 123-4567` are written that way and are what people paste as examples of their number.)
        return digits[0] in "23456789"
    if digits[0] == "0" and len(groups) >= 2:
        # Trunk-prefix national numbers; every group ≥ 2 digits rules out ISBN-10 `0-306-40615-2`.
        if min(lens) < 2 or lens[0] > 5 or digits[1] == "0":
            return False
        if all(x == 2 for x in lens):
            return nd == 10  # French pairs `06 12 34 56 78` (also dotted)
        # Dotted 3-3-3 (`065.306.521`) reads as a thousands-separated count, not a phone.
        return 9 <= nd <= 12 and "." not in sep_chars
    return False


# --------------------------------------------------------------------------------------------------------
# IPv4 / IPv6

_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)")
_VERSION_BEFORE = re.compile(
    r"(?:\bv|\bver\.?|\bversions?|\brelease|\bbuild|\bfirmware|\bOID|\bsection|\bsec\.|§|\bchapter|\bclause"
    r"|\bappendix|==|>=|<=|~=|\^|~|[A-Za-z]/)[ \t]*[:=]?[ \t]*\Z",
    re.I,
)


# `from version 2.1.0.15 to 2.1.0.17`, `v1.2.3.4 – 1.2.3.9`: the quad right after a version is one too.
_VERSION_JOIN = re.compile(r"[ \t]*(?:to|and|or|->|→|–|-|,|/)[ \t]*\Z")


def _find_ipv4(text: str, scan: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    version_end = -1  # end of the last quad read as a version
    for m in _iter_regions(_IPV4, scan):
        start, end = m.span()
        if end < len(text) and text[end] == "." and end + 1 < len(text) and text[end + 1].isdigit():
            continue  # `1.2.3.4.5`: OIDs and long versions
        if start > 0 and text[start - 1] in "<>":
            continue
        if _VERSION_BEFORE.search(text, max(0, start - 16), start) or (
            0 <= version_end <= start <= version_end + 6 and _VERSION_JOIN.match(text, version_end, start)
        ):
            version_end = end
            continue
        try:
            addr = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue  # octet > 255 or a leading zero
        if not addr.is_global or addr.is_multicast:
            continue
        out.append((start, end))
    return out


_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_HEX_COLON_DOT = frozenset("0123456789abcdefABCDEF:.")


def _find_ipv6(text: str, _: _Scan) -> list[tuple[int, int]]:
    if "::" not in text and text.count(":") < 7:
        return []
    out: list[tuple[int, int]] = []
    n = len(text)
    i = text.find(":")
    while i != -1:
        left = i
        while left > 0 and i - left < 40 and text[left - 1] in _HEX_COLON:
            left -= 1
        right = i + 1
        while right < n and right - left < 46 and text[right] in _HEX_COLON_DOT:
            right += 1
        # Sentence punctuation and a trailing label colon (`addr 2a00::1:`) are not part of the address.
        while right > left and text[right - 1] == ".":
            right -= 1
        if right - left >= 2 and text[right - 1] == ":" and text[right - 2] != ":":
            right -= 1
        cand = text[left:right]
        ok = (
            cand.count(":") >= 2
            and ("::" in cand or cand.count(":") == 7 or (cand.count(":") == 6 and "." in cand))
            and (left == 0 or not (_glued(text[left - 1]) or text[left - 1] in ":."))
            and (right == n or not _glued(text[right]))
        )
        if ok and _ipv6_public(cand):
            out.append((left, right))
        # The run around this colon is settled either way; continue after it.
        i = text.find(":", max(i + 1, right))
    return out


def _ipv6_public(cand: str) -> bool:
    if "." in cand and not re.search(r":\d{1,3}(?:\.\d{1,3}){3}$", cand):
        return False
    try:
        addr = ipaddress.IPv6Address(cand)
    except ValueError:
        return False
    mapped = addr.ipv4_mapped
    if mapped is not None:  # `::ffff:81.2.69.142` is the IPv4 host in IPv6 clothing
        return mapped.is_global and not mapped.is_multicast
    # Only 2000::/3 is handed out as global unicast; requiring it also rejects hex words that happen to
    # parse as addresses (`a::b`, `cafe::face`, `dead::beef`).
    return addr in _GLOBAL_UNICAST and addr.is_global


# --------------------------------------------------------------------------------------------------------
# credit cards

_CARD_RUN = re.compile(r"\d(?<![\w#.,+/<>\-]\d)(?:[ \-]?\d){11,22}+(?![\w<>])")
# (prefix range lo, hi, allowed lengths): a known issuer identification number (IIN) and its lengths.
_IIN: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset({16, 19})),  # Visa (13-digit numbers retired; they collide with EAN-13)
    (51, 55, frozenset({16})),  # Mastercard
    (2221, 2720, frozenset({16})),  # Mastercard 2-series
    (34, 34, frozenset({15})),  # Amex
    (37, 37, frozenset({15})),
    (6011, 6011, frozenset({16, 17, 18, 19})),  # Discover
    (644, 649, frozenset({16, 17, 18, 19})),
    (65, 65, frozenset({16, 17, 18, 19})),
    (36, 36, frozenset({14, 15, 16, 17, 18, 19})),  # Diners Club International
    (300, 305, frozenset({14, 16, 17, 18, 19})),
    (38, 39, frozenset({14, 16, 17, 18, 19})),
    (3528, 3589, frozenset({16, 17, 18, 19})),  # JCB
    (62, 62, frozenset({16, 17, 18, 19})),  # UnionPay
    (2200, 2204, frozenset({16, 17, 18, 19})),  # Mir
    (5018, 5018, frozenset({16, 17, 18, 19})),  # Maestro
    (5020, 5020, frozenset({16, 17, 18, 19})),
    (5038, 5038, frozenset({16, 17, 18, 19})),
    (5893, 5893, frozenset({16, 17, 18, 19})),
    (6304, 6304, frozenset({16, 17, 18, 19})),
    (6759, 6759, frozenset({16, 17, 18, 19})),
    (6761, 6763, frozenset({16, 17, 18, 19})),
)


def luhn_ok(digits: str) -> bool:
    """Luhn (mod 10) check over a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iin_ok(digits: str) -> bool:
    nd = len(digits)
    for lo, hi, lengths in _IIN:
        width = len(str(lo))
        if lo <= int(digits[:width]) <= hi and nd in lengths:
            return True
    return False


def _card_groups_ok(lens: list[int]) -> bool:
    if len(lens) == 1:
        return True
    if lens in ([4, 6, 5], [4, 6, 4]):  # Amex, Diners
        return True
    return len(lens) >= 4 and all(x == 4 for x in lens[:-1]) and 1 <= lens[-1] <= 4


def _card_ok(cand: str) -> bool:
    seps = {c for c in cand if not c.isdigit()}
    if len(seps) > 1:
        return False
    groups = _DIGIT_GROUPS.findall(cand)
    digits = "".join(groups)
    return (
        13 <= len(digits) <= 19
        and _card_groups_ok([len(g) for g in groups])
        and _iin_ok(digits)
        and luhn_ok(digits)
    )


def _find_credit_card(text: str, scan: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for m in _iter_regions(_CARD_RUN, scan):
        start, end = m.span()
        if start > 1 and text[start - 1] == ":" and text[start - 2].isdigit():
            continue
        if end < len(text) and text[end] in ".," and end + 1 < len(text) and text[end + 1].isdigit():
            continue  # `4111111111111111.50`: an amount, not a card
        cand = m.group()
        if _card_ok(cand):
            if not _code_before(text, start):
                out.append((start, end))
            continue
        # A grouped card followed by more digits (`4111 1111 1111 1111 12/27 123`): retry shorter prefixes,
        # cutting only at separators so we never match inside a longer unseparated number.
        # Allowed cuts: before an expiry (`… 12/27`) or at a separator the card itself does not use
        # (`4111-1111-1111-1111 123`). A trailing group with the card's own separator makes it one longer
        # number (`4855-0201-3461-1314-954`), not a card plus noise.
        cuts = [i for i, c in enumerate(cand) if not c.isdigit()]
        expiry = end < len(text) and text[end] == "/"
        for cut in reversed(cuts):
            prefix = cand[:cut]
            own_seps = set(prefix) - set(_DIGITS)
            if (cand[cut] not in own_seps or (expiry and cut == cuts[-1])) and _card_ok(prefix):
                if not _code_before(text, start):
                    out.append((start, start + cut))
                break
    return out


# --------------------------------------------------------------------------------------------------------
# IBAN

# Country → IBAN length (SWIFT IBAN registry).
# fmt: off
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
# fmt: on
_IBAN_RUN = re.compile(r"[A-Z](?<![A-Za-z0-9_<>][A-Z])[A-Z]\d\d(?:[ \u00a0]?[A-Z0-9]){11,30}")


def iban_ok(compact: str) -> bool:
    """Country length + ISO 7064 mod-97 check of an IBAN without spaces (upper case)."""
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    rearranged = compact[4:] + compact[:4]
    # int() of the letters-as-numbers string: A=10 … Z=35.
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _find_iban(text: str, _: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    n = len(text)
    pos = 0
    while (m := _IBAN_RUN.search(text, pos)) is not None:
        start = m.start()
        pos = start + 1
        want = _IBAN_LENGTHS.get(m.group()[:2])
        if want is None:
            continue
        # The run may continue into the next words (`… 0130 00 EUR`): cut it at the country's length.
        seen = 0
        end = start
        for j in range(start, m.end()):
            if text[j] not in " \u00a0":
                seen += 1
                if seen == want:
                    end = j + 1
                    break
        if seen != want or (end < n and (_glued(text[end]) or text[end] == "-")):
            continue  # too short, or the cut falls inside a longer token
        if iban_ok(text[start:end].replace(" ", "").replace("\u00a0", "")):
            out.append((start, end))
            pos = end
    return out


# --------------------------------------------------------------------------------------------------------
# SSN

_SSN = re.compile(r"\d(?<![\w\-/.#$<>]\d)\d\d([ \-]?)\d\d\1\d{4}(?![\w<>]|[\-.,:/]\d)")
_SSN_LABEL = re.compile(r"(?:\bssn|\bsocial security(?: number| no\.?| #)?)\W{0,6}\Z", re.I)


def _find_ssn(text: str, scan: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for m in _iter_regions(_SSN, scan):
        start, end = m.span()
        s = m.group()
        digits = s.replace("-", "").replace(" ", "")
        area, group, serial = digits[:3], digits[3:5], digits[5:]
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        # Without dashes nine digits are just a number; only trust them after an explicit label.
        if m.group(1) != "-" and not _SSN_LABEL.search(text, max(0, start - 30), start):
            continue
        out.append((start, end))
    return out


# --------------------------------------------------------------------------------------------------------
# secrets

_B64URL = r"[A-Za-z0-9_\-]"
# (precheck substrings, compiled pattern, group holding the secret (0 = whole match), extra validator)
_SecretRule = tuple[tuple[str, ...], re.Pattern[str], int, Callable[[str], bool] | None]


def _mixed(s: str) -> bool:
    """Random tokens mix letters and digits; prose words and `YOUR_API_KEY_HERE` placeholders do not."""
    return any(c.isdigit() for c in s) and any(c.isalpha() for c in s)


_PLACEHOLDER_WORDS = ("xxxx", "your", "example", "placeholder", "changeme", "dummy", "redacted")


def _real_value(s: str) -> bool:
    low = s.lower()
    return _mixed(s) and not any(w in low for w in _PLACEHOLDER_WORDS) and "${" not in s and "{{" not in s


_FILLER_RUN = re.compile(r"([A-Za-z0-9])\1{7}")


def _not_filler(s: str) -> bool:
    """`ghp_xxxx…x`, `…/T00000000/B00000000/XXXX…`: documentation fillers have long runs of one character."""
    return _FILLER_RUN.search(s) is None


def _token_ok(s: str) -> bool:
    return _mixed(s) and _not_filler(s)


def _basic_credentials(s: str) -> bool:
    """HTTP Basic values are base64 of `user:password`; decoding tells them apart from prose."""
    try:
        return b":" in base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except ValueError:
        return False


def _openai_ok(s: str) -> bool:
    body = s.split("-")[-1] if s.count("-") <= 3 else s
    return _mixed(s) and any(c.isupper() for c in body) and any(c.islower() for c in body)


# Each pattern begins with a literal so the regex engine scans for it in C; the lookbehind that follows
# re-checks the left boundary.
_SECRET_RULES: tuple[_SecretRule, ...] = (
    # AWS access key ids: AKIA = long-term, ASIA = temporary (STS). Other `A…A` prefixes name IAM users
    # and roles: identifiers, not credentials.
    (
        ("AKIA", "ASIA"),
        re.compile(r"A(?<![A-Za-z0-9]A)(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
        0,
        _not_filler,
    ),
    # AWS secret access keys are 40 base64 chars with no prefix: only trusted next to their name.
    (
        ("ecret_", "ECRET_", "ecretAccess", "ecret_access"),
        re.compile(
            r"(?i:aws_?secret(?:_?access)?_?key|secret_?access_?key)[\"']?\s*(?::=|=>|[:=])\s*[\"']?"
            r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
        ),
        1,
        _mixed,
    ),
    (
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        re.compile(r"g(?<![\w]g)(?:h[pousr]_[A-Za-z0-9]{36,251}|ithub_pat_\w{22,242})(?!\w)"),
        0,
        _not_filler,
    ),
    (("xox",), re.compile(r"xox(?<![\w]xox)[abposre]-[A-Za-z0-9\-]{10,250}"), 0, _token_ok),
    (
        ("hooks.slack.com",),
        re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{16,}"),
        0,
        _not_filler,
    ),
    (
        ("k_live_", "k_test_"),
        re.compile(r"[sr]k_(?<![\w][sr]k_)(?:live|test)_[A-Za-z0-9]{16,247}(?!\w)"),
        0,
        _token_ok,
    ),
    (("AIza",), re.compile(r"AIza(?<![\w\-]AIza)" + _B64URL + r"{35}(?![A-Za-z0-9_\-])"), 0, _not_filler),
    (("sk-",), re.compile(r"sk-(?<![\w\-]sk-)[A-Za-z0-9_\-]{20,200}(?![A-Za-z0-9_\-])"), 0, _openai_ok),
    (
        ("eyJ",),
        re.compile(r"eyJ(?<![\w\-.]eyJ)" + _B64URL + r"{10,}\.eyJ" + _B64URL + r"{10,}\." + _B64URL + "*"),
        0,
        None,
    ),
    # Passwords in URL userinfo: `postgres://app:s3cret@db:5432/prod`, `https://user:tok3n@host/` (only the
    # password is redacted; `${DB_PASSWORD}` / `password` placeholders are skipped).
    (("://",), re.compile(r"://[^\s/@:]{0,64}:([^\s/@:]{3,128})@(?=[\w\[])"), 1, _real_value),
    # HTTP auth header values (the scheme word stays readable: `Authorization: Bearer <SECRET>`).
    (
        ("earer", "EARER"),
        re.compile(r"[Bb](?<![\w][Bb])(?:earer|EARER)\s+([A-Za-z0-9\-._~+/]{16,}=*)(?![A-Za-z0-9\-._~+/=])"),
        1,
        _real_value,
    ),
    (
        ("uthorization", "UTHORIZATION"),
        re.compile(
            r"[Aa](?<![\w][Aa])(?:uthorization|UTHORIZATION)[\"']?\s*[:=]\s*[\"']?(?i:token)\s+([A-Za-z0-9\-._~+/]{12,}=*)"
            r"(?![A-Za-z0-9\-._~+/=])"
        ),
        1,
        _real_value,
    ),
    (
        ("uthorization", "UTHORIZATION"),
        re.compile(
            r"[Aa](?<![\w][Aa])(?:uthorization|UTHORIZATION)[\"']?\s*[:=]\s*[\"']?(?i:basic)\s+([A-Za-z0-9+/]{8,}=*)(?![A-Za-z0-9+/=])"
        ),
        1,
        _basic_credentials,
    ),
)

# PEM private keys: the whole block to its END line; a block cut off before END runs to the end of its
# base64 body (plain or `\n`-escaped newlines, as in JSON service-account files).
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# A body line must be base64 *up to its end* (or an RFC 1421 header, or blank), so the prose line after a
# truncated block is not swallowed.
_PEM_BODY = re.compile(
    r"(?:(?:\r?\n|\\n)"
    r"(?:[A-Za-z0-9+/=]+(?=\r?\n|\\n|[\"'`]|\Z)"  # a whole line of base64
    r"|[A-Za-z0-9+/=]{16,}(?=\s)"  # a long base64 run that prose follows on the same line
    r"|(?:Proc-Type|DEK-Info|Comment): [^\r\n\\]*"
    r"|(?=\r?\n|\\n)))+"  # a blank line
)

# Quoted values assigned to credential-like names in code and config (`api_key = "…"`, `password: '…'`).
# We find the name words with str.find on the lower-cased text (fast, rare in prose), widen each hit to its
# whole identifier, require the identifier to *end* in a credential name (`db_password`, `clientSecret`; not
# `password_hint`), then match the assignment and quoted value right after it.
_CREDENTIAL_WORDS = ("key", "secret", "token", "passw")
_IDENT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_CREDENTIAL_NAME = re.compile(
    r"[a-z0-9_\-]*?(?:api[_\-]?key|api[_\-]?secret|secret[_\-]?key|private[_\-]?key|access[_\-]?key|"
    r"client[_\-]?secret|(?:api|access|auth|refresh|bearer|bot|session|github|slack)[_\-]?token|"
    r"password|passwd)"
)
_ASSIGNED_VALUE = re.compile(r"[\"']?[ \t]*(?::=|=>|[:=])[ \t]*([\"'])([^\"'\s<>]{8,200})\1")


_SECRET_HINTS = re.compile(
    "|".join(
        re.escape(h)
        for h in sorted(
            {h for rule in _SECRET_RULES for h in rule[0]} | {"PRIVATE KEY"}, key=len, reverse=True
        )
    )
)


def _find_pem(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while (m := _PEM_BEGIN.search(text, pos)) is not None:
        end_m = _PEM_END.search(text, m.end())
        next_begin = _PEM_BEGIN.search(text, m.end())
        if end_m is not None and (next_begin is None or end_m.start() < next_begin.start()):
            end = end_m.end()
        else:
            body = _PEM_BODY.match(text, m.end())
            end = body.end() if body else m.end()
        out.append((m.start(), end))
        pos = end
    return out


def _find_assigned(text: str) -> list[tuple[int, int]]:
    low = text.lower()
    n = len(text)
    out: list[tuple[int, int]] = []
    checked: set[int] = set()
    for word in _CREDENTIAL_WORDS:
        i = low.find(word)
        while i != -1:
            end = i + len(word)
            while end < n and low[end] in _IDENT:
                end += 1
            if end not in checked:
                checked.add(end)
                start = i
                while start > 0 and low[start - 1] in _IDENT:
                    start -= 1
                if _CREDENTIAL_NAME.fullmatch(low, start, end):
                    m = _ASSIGNED_VALUE.match(text, end)
                    if m and _real_value(m.group(2)):
                        out.append(m.span(2))
            i = low.find(word, end)
    return out


def _find_secret(text: str, _: _Scan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    # One C-level pass for every rule's literal hint; a rule runs only if one of its hints occurs.
    hints = set(_SECRET_HINTS.findall(text))
    for needles, pattern, group, check in _SECRET_RULES if hints else ():
        if hints.isdisjoint(needles):
            continue
        for m in pattern.finditer(text):
            value = m.group(group)
            if check is None or check(value):
                out.append(m.span(group))
    if "PRIVATE KEY" in hints:
        out.extend(_find_pem(text))
    if "'" in text or '"' in text:
        out.extend(_find_assigned(text))
    return out


# --------------------------------------------------------------------------------------------------------
# dispatch


class _Scan:
    """Per-text facts shared by the detectors, computed once per call and only if needed.

    ``regions`` are the numeric clusters that could hold a phone, card, SSN or IPv4 — runs of at least eight
    digits joined by short separators, or dotted quads — padded by a few
    characters so the detectors' look-aheads still see what follows. One C-level pass finds them; the four
    numeric detectors then run their regexes only there instead of each scanning every digit of the text
    (the per-digit attempt cost, not the matching, is what dominates on number-heavy text).
    """

    __slots__ = ("_regions", "text")

    def __init__(self, text: str):
        self.text = text
        self._regions: list[tuple[int, int, int]] | None = None

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        """``(start, end, padded end)`` of each cluster; matches may run into the padding, not start there."""
        if self._regions is None:
            n = len(self.text)
            self._regions = [
                (m.start(), m.end(), min(n, m.end() + 3)) for m in _NUMERIC_CLUSTER.finditer(self.text)
            ]
        return self._regions


_NUMERIC_CLUSTER = re.compile(
    # (the look-behind stops the engine from retrying at every digit of a short number)
    r"[0-9](?<![0-9][0-9])(?:[ ().\-/\u00a0]{0,3}+[0-9]){7,}+"  # ≥ 8 digits, short separators: phone, card, SSN
    r"|[0-9]{1,3}(?:\.[0-9]{1,3}){3}"  # a dotted quad: IPv4
)


_DETECTORS: dict[str, Callable[[str, _Scan], list[tuple[int, int]]]] = {
    "email": _find_email,
    "phone": _find_phone,
    "ipv4": _find_ipv4,
    "ipv6": _find_ipv6,
    "credit_card": _find_credit_card,
    "iban": _find_iban,
    "ssn": _find_ssn,
    "secret": _find_secret,
}


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):  # `find_pii(t, "email")` means one kind, not five letters
        kinds = (kinds,)
    seen = tuple(dict.fromkeys(kinds))
    for k in seen:
        if k not in _DETECTORS:
            raise UserInputError(f"unknown PII kind {k!r}; expected one of: {', '.join(KINDS)}")
    return seen


def _detect(text: str, kinds: tuple[str, ...]) -> list[PIIMatch]:
    if not text:
        return []
    scan = _Scan(text)
    cands: list[tuple[int, int, str]] = []
    for kind in kinds:
        cands.extend((s, e, kind) for s, e in _DETECTORS[kind](text, scan))
    if not cands:
        return []
    cands.sort()
    if all(cands[i][1] <= cands[i + 1][0] for i in range(len(cands) - 1)):
        # Common case: nothing overlaps (also removes exact duplicates' cost: they would overlap).
        return [PIIMatch(k, s, e, text[s:e]) for s, e, k in cands]
    # Greedy by (priority, longer span, earlier start); `starts`/`ends` hold the accepted, disjoint spans.
    cands.sort(key=lambda c: (_RANK[c[2]], c[0] - c[1], c[0]))
    starts: list[int] = []
    ends: list[int] = []
    kept: list[tuple[int, int, str]] = []
    for s, e, k in cands:
        i = bisect.bisect_right(starts, s)
        if i > 0 and ends[i - 1] > s:
            continue  # overlaps the accepted span that starts at or before s
        if i < len(starts) and starts[i] < e:
            continue  # overlaps the next accepted span
        starts.insert(i, s)
        ends.insert(i, e)
        kept.append((s, e, k))
    kept.sort()
    return [PIIMatch(k, s, e, text[s:e]) for s, e, k in kept]


def find_pii(text: str, kinds: Iterable[str] = KINDS) -> list[PIIMatch]:
    """All PII spans of the requested kinds, sorted by start and non-overlapping.

    Overlaps between kinds go to the higher-priority kind (secret > email > iban > credit_card > ssn > ipv6 >
    ipv4 > phone), then to the longer span. Raises ``UserInputError`` for an unknown kind.
    """
    return _detect(text, _check_kinds(kinds))


def _check_actions(actions: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for kind, action in actions.items():
        if kind not in _DETECTORS:
            raise UserInputError(f"unknown PII kind {kind!r}; expected one of: {', '.join(KINDS)}")
        if action not in ACTIONS:
            raise UserInputError(
                f"unknown PII action {action!r} for kind {kind!r}; expected one of: {', '.join(ACTIONS)}"
            )
        checked[kind] = action
    return checked


class PIIScrubber:
    """A reusable scrubber for one action table: ``PIIScrubber({"email": "redact"})(text)``.

    Kinds whose action is ``keep`` (or that are missing) are not scanned at all, so keeping a kind costs
    nothing. Only the action table is stored; the compiled regexes are module globals, so instances pickle
    small and cheaply (datatrove ships pipeline steps to worker processes).
    """

    def __init__(self, actions: Mapping[str, str]):
        self.actions = _check_actions(actions)
        # Detect in KINDS order so results do not depend on the mapping's order.
        self._active: tuple[str, ...] = tuple(k for k in KINDS if self.actions.get(k, "keep") != "keep")

    def __repr__(self) -> str:
        return f"PIIScrubber({self.actions!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PIIScrubber) and self.actions == other.actions

    __hash__ = None  # type: ignore[assignment]  # mutable-ish config object; equality is for tests

    def __call__(self, text: str) -> ScrubResult:
        if not self._active:
            return ScrubResult(text=text)
        matches = _detect(text, self._active)
        if not matches:
            return ScrubResult(text=text)
        counts: dict[str, int] = {}
        parts: list[str] = []
        pos = 0
        for m in matches:
            counts[m.kind] = counts.get(m.kind, 0) + 1
            if self.actions[m.kind] == "redact":
                parts.append(text[pos : m.start])
                parts.append(PLACEHOLDERS[m.kind])
                pos = m.end
        parts.append(text[pos:])
        drop_kinds = [k for k in KINDS if k in counts and self.actions[k] == "drop-document"]
        return ScrubResult(text="".join(parts), counts=counts, drop=bool(drop_kinds), drop_kinds=drop_kinds)


def scrub(text: str, actions: Mapping[str, str]) -> ScrubResult:
    """Apply ``actions`` (kind → ``redact`` | ``drop-document`` | ``keep``) to ``text``.

    Kinds missing from ``actions`` are kept. For many texts build one ``PIIScrubber`` and reuse it.
    """
    return PIIScrubber(actions)(text)
