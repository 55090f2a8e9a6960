"""PII detection and redaction for support text: e-mail, phone, payment card and IBAN.

Kept libraries decide what a number is: ``phonenumbers`` (Google's libphonenumber) finds and
validates phone numbers, ``python-stdnum`` checks Luhn for cards and the IBAN registry (length,
structure, mod-97). Regexes only find card- and IBAN-shaped candidates and e-mail addresses.
Data validation rejects responses that contain PII, and the feedback builder redacts user text
with the same detector before it can reach a dataset.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal, NamedTuple

PiiKind = Literal["email", "phone", "card", "iban"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "iban", "card", "phone")  # detection order = priority

# Regions whose national layouts ("(415) 555-2671", "020 7946 0958", "01 23 45 67 89",
# "0049 30 …") are recognised without a "+"; a number written with "+" is found in any region.
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR")


class PiiMatch(NamedTuple):
    """One piece of PII found in a text."""

    kind: PiiKind
    span: tuple[int, int]
    text: str


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)

# Where an IBAN may start: country code and check digits not glued to a longer word. The rest
# is read up to the country's registry length, so trailing words are never swallowed.
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])(?=([A-Za-z]{2})\d{2}[ -]?[A-Za-z0-9])")

# Card numbers as people write them: 13-19 digits in one run, groups of four with one
# consistent separator (16-19 digits), or the 4-6-5 / 4-6-4 layouts of Amex and Diners.
_CARD = re.compile(
    r"(?<![\w.,/-])(?:"
    r"\d{13,19}"
    r"|\d{4}(?P<s1>[ -])\d{4}(?P=s1)\d{4}(?P=s1)\d{4}(?:(?P=s1)\d{1,3})?"
    r"|\d{4}(?P<s2>[ -])\d{6}(?P=s2)\d{4,5}"
    r")(?![\w]|[.,]\d)"
)
# Major industry identifiers 2-6 cover the card networks (Mastercard 2-series, Amex/Diners/JCB,
# Visa, Mastercard/Maestro, Discover/UnionPay); other leading digits are account or order ids.
_CARD_FIRST_DIGITS = frozenset("23456")

# libphonenumber accepts a number glued to an amount, an id or a time ("#415-555-2671",
# "05.06.2024 14:30" in France); support text is full of those, so such matches are refused.
_GLUED_BEFORE = re.compile(r"[\w#$€£¥/.,:+-]")
_GLUED_AFTER = re.compile(r"\w|[.,:-]\d")
_MIN_PHONE_DIGITS = 7  # fewer digits cannot be a phone number anywhere: skip the matcher

_TAGS: dict[PiiKind, str] = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]"}


def luhn_ok(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum of payment card numbers."""
    from stdnum import luhn

    return digits.isdigit() and luhn.is_valid(digits)


def iban_ok(iban: str) -> bool:
    """Whether a compact IBAN matches its country's registry entry and passes the mod-97 check."""
    from stdnum import iban as stdnum_iban

    # No per-country bank-code check: a stale bank table must not let a real IBAN through.
    return iban.isalnum() and stdnum_iban.is_valid(iban, check_country=False)


def find_pii(text: str, regions: Sequence[str] = PHONE_REGIONS) -> list[PiiMatch]:
    """Find e-mail addresses, phone numbers, payment card numbers and IBANs in ``text``.

    Args:
        text: any user or model text.
        regions: regions whose national phone layouts count (international ones always do).

    Returns:
        Non-overlapping matches ordered by position. Card-shaped numbers that fail Luhn and
        IBAN-shaped strings that fail their check are not PII, and their digits are not re-read
        as phone numbers.
    """
    if not isinstance(text, str) or not text:
        return []
    taken: list[tuple[int, int]] = []  # spans claimed by a stronger detector, valid or not
    found: list[PiiMatch] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e in taken)

    for m in _EMAIL.finditer(text):
        taken.append(m.span())
        found.append(PiiMatch("email", m.span(), m.group()))

    for start, end, valid in _iban_candidates(text):
        if free(start, end):
            taken.append((start, end))
            if valid:
                found.append(PiiMatch("iban", (start, end), text[start:end]))

    for m in _CARD.finditer(text):
        if not free(*m.span()):
            continue
        digits = re.sub(r"\D", "", m.group())
        taken.append(m.span())
        if digits[0] in _CARD_FIRST_DIGITS and luhn_ok(digits):
            found.append(PiiMatch("card", m.span(), m.group()))

    for start, end in _phone_spans(text, tuple(regions)):
        if free(start, end):
            taken.append((start, end))
            found.append(PiiMatch("phone", (start, end), text[start:end]))

    return sorted(found, key=lambda match: match.span)


def redact(text: str) -> str:
    """``text`` with every PII match replaced by its tag: [EMAIL], [PHONE], [CARD] or [IBAN]."""
    return redact_counts(text)[0]


def redact_counts(text: str) -> tuple[str, Counter[PiiKind]]:
    """Redact ``text`` like :func:`redact`, and count what was redacted.

    Args:
        text: any user or model text.

    Returns:
        The redacted text and the number of matches of each kind (only kinds found).
    """
    parts, last, counts = [], 0, Counter[PiiKind]()
    for match in find_pii(text):
        start, end = match.span
        parts += [text[last:start], _TAGS[match.kind]]
        last = end
        counts[match.kind] += 1
    return ("".join(parts) + text[last:] if parts else text), counts


def _phone_spans(text: str, regions: tuple[str, ...]) -> list[tuple[int, int]]:
    """Spans of valid phone numbers in any of ``regions``, longest first where they overlap."""
    if sum(ch.isdigit() for ch in text) < _MIN_PHONE_DIGITS:
        return []
    import phonenumbers

    spans: set[tuple[int, int]] = set()
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            start, end = match.start, match.end
            glued = (start > 0 and _GLUED_BEFORE.match(text[start - 1])) or _GLUED_AFTER.match(text, end)
            if not glued:
                spans.add((start, end))
    chosen: list[tuple[int, int]] = []
    for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
        if not chosen or start >= chosen[-1][1]:
            chosen.append((start, end))
    return chosen


@functools.cache
def _iban_length(country: str) -> int | None:
    """The IBAN length of a country from the registry that python-stdnum ships (None: no IBAN)."""
    from stdnum import numdb

    (_, info), *_ = numdb.get("iban").info(country)
    structure = info.get("bban")
    return 4 + sum(int(n) for n in re.findall(r"(\d+)!", structure)) if structure else None


def _iban_candidates(text: str) -> list[tuple[int, int, bool]]:
    """Spans of IBAN-shaped strings of a known country, cut to its length, and their validity."""
    spans: list[tuple[int, int, bool]] = []
    for m in _IBAN_START.finditer(text):
        start = m.start()
        length = _iban_length(m.group(1).upper())
        # An unknown country is not an IBAN: "AB12 CDEF …" product codes would otherwise pass
        # a 1-in-97 checksum by chance.
        if length is None or (spans and start < spans[-1][1]):
            continue
        # Walk to the country's length in alphanumerics, allowing one separator between them.
        chars, pos = [], start
        while pos < len(text) and len(chars) < length:
            if text[pos].isalnum() and text[pos].isascii():
                chars.append(text[pos])
            elif not (text[pos] in " -" and chars and pos + 1 < len(text) and text[pos + 1].isalnum()):
                break
            pos += 1
        if len(chars) < length or (pos < len(text) and text[pos].isalnum()):
            continue  # too short, or glued to more text: not this country's IBAN
        spans.append((start, pos, iban_ok("".join(chars))))
    return spans
