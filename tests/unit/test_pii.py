"""The PII detector: true positives per kind, support-text negatives, and redaction."""

from __future__ import annotations

import pytest

from components.data import corpus_texts, policy_facts, policy_versions
from components.pii import PiiMatch, find_pii, iban_ok, luhn_ok, redact

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "kind", "found"),
    [
        ("Mail me at jane.doe+orders@example.co.uk please", "email", "jane.doe+orders@example.co.uk"),
        ("support@shop.example.com", "email", "support@shop.example.com"),
        ("Call +1 (415) 555-2671 today", "phone", "+1 (415) 555-2671"),
        ("call (415) 555-2671", "phone", "(415) 555-2671"),
        ("my number is 415-555-2671.", "phone", "415-555-2671"),
        ("415.555.2671", "phone", "415.555.2671"),
        ("toll free 1-800-555-0199", "phone", "1-800-555-0199"),
        ("+14155552671", "phone", "+14155552671"),
        ("London office: +44 20 7946 0958", "phone", "+44 20 7946 0958"),
        ("ring 020 7946 0958 after six", "phone", "020 7946 0958"),
        ("Berlin 0049 30 12345678", "phone", "0049 30 12345678"),
        ("Paris 01 23 45 67 89", "phone", "01 23 45 67 89"),
        ("Visa test card 4111 1111 1111 1111, exp 12/30", "card", "4111 1111 1111 1111"),
        ("card: 4111111111111111.", "card", "4111111111111111"),
        ("5555-5555-5555-4444", "card", "5555-5555-5555-4444"),
        ("Amex 3782 822463 10005", "card", "3782 822463 10005"),
        ("IBAN DE89 3704 0044 0532 0130 00 is mine", "iban", "DE89 3704 0044 0532 0130 00"),
        ("DE89370400440532013000", "iban", "DE89370400440532013000"),
        ("pay GB82 WEST 1234 5698 7654 32 now", "iban", "GB82 WEST 1234 5698 7654 32"),
        ("fr1420041010050500013m02606", "iban", "fr1420041010050500013m02606"),
    ],
)
def test_finds_each_kind(text, kind, found):
    matches = find_pii(text)
    assert [(m.kind, m.text) for m in matches] == [(kind, found)]
    (match,) = matches
    assert text[match.span[0] : match.span[1]] == found


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # 16 digits failing Luhn
        "4111111111111112",
        "reference 1234567812345670",  # passes Luhn, but no card network starts with 1
        "bad IBAN DE89 3704 0044 0532 0130 01",  # fails mod-97; its digits are no phone either
        "XY12 3456 7890 1234 5678 90",  # not an IBAN country
        "Standard shipping costs $4.99, express $14.99, free over $50.",
        "A new laptop is $1,299.99 or 1.299,99 €.",
        "Delivery takes 3-5 business days; express 1-2 business days.",
        "order #123-456-7890",
        "order A123-456-7890",
        "Order 100234567 shipped",
        "extension 555-0199",
        "on 05.06.2024 14:30",
        "2024-01-15T10:30:00Z",
        "version 1.2.3.4",
        "Reach us @support on social media",
        "Visa, Mastercard, PayPal and Apple Pay",
    ],
)
def test_ignores_support_text_that_is_not_pii(text):
    assert find_pii(text) == []
    assert redact(text) == text


def test_corpus_and_policy_facts_hold_no_pii():
    facts = [fact for version in policy_versions() for fact in policy_facts(version).values()]
    texts = corpus_texts(0) + facts
    assert [t for t in texts if find_pii(t)] == []


def test_several_matches_in_order_without_overlap():
    text = (
        "Email a.b@example.org, call +1 415 555 2671, card 4111-1111-1111-1111, IBAN DE89370400440532013000."
    )
    matches = find_pii(text)
    assert [m.kind for m in matches] == ["email", "phone", "card", "iban"]
    assert all(a.span[1] <= b.span[0] for a, b in zip(matches, matches[1:], strict=False))
    assert isinstance(matches[0], PiiMatch)


def test_redact_replaces_each_match_with_its_tag():
    text = (
        "Hi, I'm jane@example.com, +1 (415) 555-2671; card 4111 1111 1111 1111; DE89 3704 0044 0532 0130 00."
    )
    assert redact(text) == "Hi, I'm [EMAIL], [PHONE]; card [CARD]; [IBAN]."
    assert redact("no pii here, $4.99 in 3-5 business days") == "no pii here, $4.99 in 3-5 business days"
    assert redact("") == ""


def test_checksums():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112") and not luhn_ok("41111a1111111111")
    assert iban_ok("DE89370400440532013000") and iban_ok("gb82west12345698765432")
    assert not iban_ok("DE89370400440532013001")
    assert not iban_ok("DE8937040044053201300")  # one character short for Germany


# Decided by phonenumbers / python-stdnum rather than hand-written tables ----------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("mobile 07911 123456 please", "07911 123456"),  # UK mobile layout
        ("Berlin office 030 12345678", "030 12345678"),  # German area code + subscriber
        ("+33 6 12 34 56 78", "+33 6 12 34 56 78"),
    ],
)
def test_phone_layouts_a_library_knows(text, found):
    assert [(m.kind, m.text) for m in find_pii(text)] == [("phone", found)]


@pytest.mark.parametrize(
    "text",
    [
        "ref 123-456-7890",  # no North American area code starts with 1
        "call +1 555 555 5555",  # 555 is not an assigned area code
        "IBAN GB25123412345698765432",  # passes mod-97, but a GB IBAN has a 4-letter bank code
    ],
)
def test_number_shapes_that_are_not_valid_numbers(text):
    assert find_pii(text) == []


def test_redact_counts_reports_each_kind():
    from components.pii import redact_counts

    text, counts = redact_counts("a@example.com, b@example.org, +1 (415) 555-2671 and 4111 1111 1111 1111")
    assert text == "[EMAIL], [EMAIL], [PHONE] and [CARD]"
    assert counts == {"email": 2, "phone": 1, "card": 1}
    assert redact_counts("nothing here") == ("nothing here", {})
