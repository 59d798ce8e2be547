"""PII recognisers (a candidate pattern, then a validator) and normalised matching of words, phrases and regexes.

Recognisers: e-mail, phone (libphonenumber's validation), payment card (IIN + Luhn), IBAN (length per country +
mod-97), IPv4/IPv6 (ipaddress), US SSN (SSA's rules), and a user list of names/terms. Block lists match on a
normalised view of the text (NFKC, case-folded, accents, zero-width characters and up to SEP_MAX separators between
letters dropped), so `f.r.e.e`, `ｆｒｅｅ` and `fr\u200bee` all match `free`; spans always point into the original text.
llmkit.trust.guard builds the guard on these.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

PII_TYPES = ("email", "phone", "card", "iban", "ipv4", "ipv6", "ssn", "term")


@dataclass
class Finding:
    """One match: its type (a PII type or a policy category), span [start, end) in the text, matched text, score."""
    type: str
    start: int
    end: int
    text: str
    score: float = 1.0
    category: str = "pii"  # "pii" or the policy category that matched

    def to_dict(self) -> dict:
        return {"type": self.type, "category": self.category, "start": self.start, "end": self.end,
                "text": self.text, "score": round(self.score, 4)}


# ---------------------------------------------------------------------------------------------------------------
# PII recognisers: a candidate pattern, then a validator


EMAIL = re.compile(r"(?<![\w.+-])(?<!\w')[A-Za-z0-9](?:[A-Za-z0-9._%+'-]{0,63})@"
                   r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)"
                   r"+[A-Za-z]{2,63}(?![\w-])")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
IBAN = re.compile(r"(?<![\w])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?![\w])")  # any case: mod-97 decides
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
# nine bare digits right after the word SSN / social security number (without the word they are any number)
SSN_BARE = re.compile(r"(?i)\b(?:ssn|social security (?:number|no\.?|#))[\s:#.=-]{0,4}(\d{3})(\d{2})(\d{4})(?![\w-])")
# a maximal run of digit groups: never part of a longer number (a card, an IBAN's BBAN)
PHONE = re.compile(r"(?<![\w+#/.-])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d(?:[ .-]?\d){5,14}"
                   r"(?![\w/-]|[ .]\d)")
IBAN_HEAD = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4})* ?[A-Za-z0-9]{0,4} $")
_DIGIT = re.compile(r"\d")
PHONE_CONTEXT = re.compile(r"(?i)\b(?:phone|tel|telephone|call|mobile|cell|fax|whatsapp|sms|text me|ring)\b")

# IBAN lengths per country (SWIFT IBAN registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (payment cards)."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_brand(digits: str) -> str | None:
    """The card network an IIN prefix and length belong to, or None (then it is not a card number)."""
    n, p2, p4, p6 = len(digits), int(digits[:2]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or p2 == 65 or 644 <= p4 // 10 <= 649 or 622126 <= p6 <= 622925) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (p2 in (36, 38, 39) or 300 <= p4 // 10 <= 305) and 14 <= n <= 19:
        return "diners"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if (p2 in (50, 56, 57, 58) or digits[:2] in ("67", "63")) and 16 <= n <= 19:
        return "maestro"  # the spec allows 12-19 digits; shorter ones collide with EAN-13 barcodes
    return None


def iban_ok(text: str) -> bool:
    """Country length and the ISO 7064 mod-97 check of an IBAN (spaces ignored)."""
    s = text.replace(" ", "").upper()
    if IBAN_LENGTHS.get(s[:2]) != len(s) or not s.isalnum():
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _iban_prefix(s: str) -> str | None:
    """The start of s holding as many characters as its country's IBAN (spaces between them), or None; the
    candidate pattern may have run on into a following word ("... 32 ok")."""
    n, want = 0, IBAN_LENGTHS.get(s[:2].upper())
    for i, c in enumerate(s):
        n += c != " "
        if n == want:
            return s[:i + 1] if i + 1 == len(s) or s[i + 1] == " " else None
    return None


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA rules: no 000/666/9xx area, no 00 group, no 0000 serial."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def email_ok(s: str) -> bool:
    local, _, domain = s.rpartition("@")
    return (len(s) <= 254 and len(local) <= 64 and not local.endswith(".") and ".." not in local
            and all(0 < len(label) <= 63 for label in domain.split(".")))


def _phone_ok(candidate: str, regions: tuple[str, ...]) -> bool:
    import phonenumbers  # Google's libphonenumber: per-country numbering plans

    digits = sum(c.isdigit() for c in candidate)
    if not 7 <= digits <= 15:
        return False
    for region in (None,) if candidate.startswith("+") else regions:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


def find_pii(text: str, types=PII_TYPES, terms=None, phone_regions=("US", "GB", "DE", "FR", "IN")) -> list[Finding]:
    """Validated PII findings in text, longest first where two overlap; terms: a TermMatcher or a list of strings."""
    types = set(types)
    if not _DIGIT.search(text):  # cheap pre-checks: most of a corpus has nothing a recogniser could match
        types -= {"card", "iban", "ssn", "ipv4", "phone", "ipv6"} if ":" not in text else {"card", "iban", "ssn",
                                                                                            "ipv4", "phone"}
    if "@" not in text:
        types.discard("email")
    out: list[Finding] = []
    if "email" in types:
        out += [Finding("email", m.start(), m.end(), m.group(), 1.0) for m in EMAIL.finditer(text)
                if email_ok(m.group())]
    if "card" in types:
        for m in CARD.finditer(text):
            d = re.sub(r"\D", "", m.group())
            if 13 <= len(d) <= 19 and card_brand(d) and luhn_ok(d):
                out.append(Finding("card", m.start(), m.end(), m.group(), 1.0))
    if "iban" in types:
        for m in IBAN.finditer(text):
            s = _iban_prefix(m.group())
            if s and iban_ok(s):
                out.append(Finding("iban", m.start(), m.start() + len(s), s, 1.0))
    if "ssn" in types:
        out += [Finding("ssn", m.start(), m.end(), m.group(), 0.85) for m in SSN.finditer(text)
                if ssn_ok(*m.group(1, 3, 4))]
        out += [Finding("ssn", m.start(1), m.end(3), m.group()[m.start(1) - m.start():], 0.9)
                for m in SSN_BARE.finditer(text) if ssn_ok(*m.group(1, 2, 3))]
    if "ipv4" in types:
        for m in IPV4.finditer(text):
            try:
                ipaddress.IPv4Address(m.group())
                out.append(Finding("ipv4", m.start(), m.end(), m.group(), 0.9))
            except ValueError:
                pass
    if "ipv6" in types:
        for m in IPV6.finditer(text):
            s = m.group()
            if sum(c.isalnum() for c in s) < 2:
                continue
            try:
                ipaddress.IPv6Address(s)
                out.append(Finding("ipv6", m.start(), m.end(), s, 0.9))
            except ValueError:
                pass
    if "phone" in types:
        taken = [(f.start, f.end) for f in out]
        for m in PHONE.finditer(text):
            s = m.group()
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue  # a card, IBAN or SSN is not also a phone number
            # national numbers need phone-like grouping (3+ groups or an area code in brackets) or a phone word
            groups = re.findall(r"\d+", s)
            digits = sum(map(len, groups))
            if not s.startswith("+") and (digits > 12 or any(len(g) == 1 for g in groups[1:])
                                          or len(groups) == 2 and len(groups[1]) < 4):
                continue  # national numbers: at most 12 digits (cards have 13-19), no 1-digit groups (versions)
            if IBAN_HEAD.search(text, max(0, m.start() - 40), m.start()):
                continue  # the digits of an IBAN (a valid one is found above; an invalid one is not a phone)
            formatted = s.startswith("+") or "(" in s or len(groups) >= 3 or (
                len(groups) == 2 and groups[0].startswith("0") and 2 <= len(groups[0]) <= 6 and digits >= 9)
            context = bool(PHONE_CONTEXT.search(text, max(0, m.start() - 40), m.start()))
            if re.fullmatch(r"\d{4}([-./])\d{2}\1\d{2}|\d{3}-\d{2}-\d{4}", s) or not (formatted or context):
                continue  # ISO dates and SSN shapes; bare digit runs only next to a word such as "phone"
            if _phone_ok(s, tuple(phone_regions)):
                out.append(Finding("phone", m.start(), m.end(), s, 0.95 if formatted else 0.7))
    if "term" in types and terms:
        matcher = terms if isinstance(terms, TermMatcher) else TermMatcher(terms)
        out += [Finding("term", s, e, text[s:e], 1.0) for s, e in matcher.spans(text)]
    return resolve_overlaps(out)


def resolve_overlaps(findings: list[Finding]) -> list[Finding]:
    """Keep the longest (then highest-scoring) of overlapping findings; sorted by start."""
    keep: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-(f.end - f.start), -f.score, f.start)):
        if all(f.end <= k.start or k.end <= f.start for k in keep):
            keep.append(f)
    return sorted(keep, key=lambda f: f.start)


# ---------------------------------------------------------------------------------------------------------------
# Normalised matching of words, phrases and regexes (block/allow lists, user terms)


LEET = {"a": "a4@", "e": "e3", "i": "i1!|", "o": "o0", "s": "s5$", "t": "t7", "l": "l1|", "g": "g9", "b": "b8"}


# Cyrillic and Greek letters that look like Latin ones (the lower- and upper-case pairs of Unicode's confusables.txt
# for these scripts), mapped before case-folding: NFKC keeps them apart, so "bоmb" with a Cyrillic о would pass
HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁһԛԝаАВЕКМНОРСТХІЈЅԌ" "αβεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxijsdhqwaABEKMHOPCTXIJSG" "abeikvoptuxABEZHIKMNOPTYX")


def normalise(text: str) -> tuple[str, list[int] | range]:
    """Text with Cyrillic/Greek look-alikes of Latin letters mapped (HOMOGLYPHS), NFKC-normalised, case-folded,
    accents and zero-width/format characters removed, with each output character's index in the original text."""
    if text.isascii():  # the common case, 20x faster: one index per character
        return text.lower(), range(len(text))
    out, where = [], []
    for i, c in enumerate(text):
        if c.isascii():
            n = c.lower()
        else:
            n = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", c.translate(HOMOGLYPHS)).casefold())
            n = "".join(x for x in n if unicodedata.category(x) not in ("Mn", "Cf"))
        out.append(n)
        where += [i] * len(n)
    return "".join(out), where


SEP_MAX = 8  # separators allowed between two characters of a phrase (after normalisation): bounds a match's length


def _fuzzy(phrase: str) -> tuple[str, int]:
    """A regex for phrase on normalised text (leet variants per letter, up to SEP_MAX separators between
    characters) and the most normalised characters a match can span."""
    norm, _ = normalise(phrase)
    chars = [c for c in norm if not c.isspace()]
    parts = [f"[{re.escape(LEET[c])}]" if c in LEET else re.escape(c) for c in chars]
    return (r"(?<![^\W_])" + rf"[\W_]{{0,{SEP_MAX}}}".join(parts) + r"(?![^\W_])",
            len(chars) + SEP_MAX * (len(chars) - 1))


def _widest(regex: str) -> int | None:
    """The most characters a regex can match, or None when unbounded (`+`, `*`, `{n,}`)."""
    from re import _parser  # the stdlib's own regex parser; getwidth() gives (min, max)

    hi = _parser.parse(regex).getwidth()[1]
    return None if hi >= _parser.MAXREPEAT else hi


class TermMatcher:
    """Words, phrases and regexes matched on the normalised text; spans are in the original text."""

    def __init__(self, phrases=(), regexes=()):
        fuzzy = [_fuzzy(p) for p in phrases if normalise(p)[0].strip()]
        widths = [w for _, w in fuzzy] + [_widest(r) for r in regexes]
        # the longest match in normalised characters (None: a regex without bound); the stream guard holds that many
        self.longest = None if None in widths else max(widths, default=0)
        pats = [p for p, _ in fuzzy] + [rf"(?<!\w)(?:{r})(?!\w)" for r in regexes]
        self.pattern = re.compile("|".join(f"(?:{p})" for p in pats), re.IGNORECASE) if pats else None

    def spans(self, text: str, norm=None) -> list[tuple[int, int]]:
        if self.pattern is None or not text:
            return []
        norm, where = norm or normalise(text)
        out = []
        for m in self.pattern.finditer(norm):
            if m.end() > m.start():
                out.append((where[m.start()], where[m.end() - 1] + 1))
        return out
