"""PII detection and redaction for support text: e-mail, phone, payment card and IBAN.

Regexes find candidates; checksums (Luhn for cards, mod-97 for IBANs) and digit counts decide.
Data validation rejects responses that contain PII, and the feedback builder redacts user text
with the same detector before it can reach a dataset.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

PiiKind = Literal["email", "phone", "card", "iban"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "iban", "card", "phone")  # detection order = priority


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
# is read by hand up to the country's exact length, so trailing words are never swallowed.
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])(?=([A-Za-z]{2})\d{2}[ -]?[A-Za-z0-9])")

# IBAN length by country (ISO 13616 registry). Unknown countries are not IBANs: this keeps
# "AB12 CDEF ..." style product or order codes from passing a 1-in-97 checksum by chance.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

# Card numbers as people write them: 13-19 digits in one run, groups of four with one
# consistent separator (16-19 digits), or the 4-6-5 / 4-6-4 layouts of Amex and Diners.
_CARD = re.compile(
    r"(?<![\w.,/-])(?:"
    r"\d{13,19}"
    r"|\d{4}(?P<s1>[ -])\d{4}(?P=s1)\d{4}(?P=s1)\d{4}(?:(?P=s1)\d{1,3})?"
    r"|\d{4}(?P<s2>[ -])\d{6}(?P=s2)\d{4,5}"
    r")(?![\w]|[.,]\d)"
)

# Phone numbers: international (+ or 00 prefix), North American and national trunk-prefixed
# layouts. Every branch needs separators or a prefix, and the lookarounds refuse digits glued
# to words, amounts, decimals or ids ("#123-456-7890", "$4.99", "A123-456-7890").
_PHONE = re.compile(
    r"(?<![\w#$€£¥/.,:+-])(?:"
    r"(?:\+|00)[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]?\d{1,5}){1,5}"
    r"|(?:1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|(?:1[ .-])?\d{3}[ .-]\d{3}[ .-]\d{4}"
    r"|\(0\d{1,4}\)[ .-]?\d{2,4}(?:[ .-]?\d{2,4}){1,3}"
    r"|0\d{1,4}(?:[ .-]\d{2,4}){2,4}"
    r")(?![\w]|[.,:-]\d)"
)
_PHONE_DIGITS = (9, 15)  # E.164 allows at most 15; fewer than 9 is an extension or a code

# Major industry identifiers 2-6 cover the card networks (Mastercard 2-series, Amex/Diners/JCB,
# Visa, Mastercard/Maestro, Discover/UnionPay); other leading digits are account or order ids.
_CARD_FIRST_DIGITS = frozenset("23456")

_TAGS: dict[PiiKind, str] = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]"}


def luhn_ok(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum of payment card numbers."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """Whether a compact IBAN has its country's length and passes the ISO 7064 mod-97 check."""
    iban = iban.upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum() or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def find_pii(text: str) -> list[PiiMatch]:
    """Find e-mail addresses, phone numbers, payment card numbers and IBANs in ``text``.

    Args:
        text: any user or model text.

    Returns:
        Non-overlapping matches ordered by position. Card-shaped numbers that fail Luhn and
        IBAN-shaped strings that fail mod-97 are not PII, and their digits are not re-read as
        phone numbers.
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

    for m in _PHONE.finditer(text):
        digits = sum(ch.isdigit() for ch in m.group())
        if _PHONE_DIGITS[0] <= digits <= _PHONE_DIGITS[1] and free(*m.span()):
            taken.append(m.span())
            found.append(PiiMatch("phone", m.span(), m.group()))

    return sorted(found, key=lambda match: match.span)


def redact(text: str) -> str:
    """``text`` with every PII match replaced by its tag: [EMAIL], [PHONE], [CARD] or [IBAN]."""
    parts, last = [], 0
    for match in find_pii(text):
        start, end = match.span
        parts += [text[last:start], _TAGS[match.kind]]
        last = end
    return "".join(parts) + text[last:] if parts else text


def _iban_candidates(text: str) -> list[tuple[int, int, bool]]:
    """Spans of IBAN-shaped strings of a known country, cut to its length, and their validity."""
    spans: list[tuple[int, int, bool]] = []
    for m in _IBAN_START.finditer(text):
        start = m.start()
        length = _IBAN_LENGTHS.get(m.group(1).upper())
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
