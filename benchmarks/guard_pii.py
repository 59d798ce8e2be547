"""PII detection of llmkit.trust.guard on a labelled set built from templates: precision/recall per type, false
positives on clean look-alikes, MB/s; against a baseline of bare patterns (the same candidates without validators).

The set: valid payment cards (Visa, Mastercard, Amex, Discover, JCB; Luhn check digit computed; with spaces, dashes
or none), invalid ones (one digit off), valid IBANs of 8 countries (mod-97 check digits computed) and invalid ones,
e-mails, phone numbers of 8 countries in E.164, international and national formats (libphonenumber's example
numbers with random subscriber digits, kept when its numbering plan says valid), IPv4/IPv6, US SSNs; and clean text
that looks similar: order and invoice numbers, dates, times, versions, prices, ISBNs, EAN barcodes, coordinates,
hashes, tracking numbers. Targets (issue 13): recall >= 0.99 on valid cards, IBANs and e-mails, <= 1 % of the
look-alike records with any finding. Writes benchmarks/results/guard_pii.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/guard_pii.py [--n 400] [--repeats 3]
"""
import argparse
import random
import re
import string
import sys
import time
from pathlib import Path

import phonenumbers

from llmkit.utils.io import write_results
from llmkit.trust.guard import Finding, Guard, evaluate_guard, luhn_ok

ROOT = Path(__file__).resolve().parent.parent
CARD_PREFIXES = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16),
                 ("65", 16), ("3530", 16)]
IBAN_SPECS = {"DE": "n18", "GB": "a4n14", "FR": "n10c11n2", "NL": "a4n10", "ES": "n20", "IT": "a1n10c12",
              "BE": "n12", "CH": "n5c12"}
REGIONS = ["US", "GB", "DE", "FR", "IN", "JP", "BR", "AU"]
FIRST = ["anna", "ben", "chloe", "david", "emma", "farid", "giulia", "hiro", "ines", "jonas", "kofi", "lena"]
DOMAINS = ["example.com", "mail.example.org", "uni-bonn.de", "corp.co.uk", "outlook.fr", "firma.ch"]
TEMPLATES = ["Please charge {v} for the order.", "My details: {v}.", "You can reach me via {v} tomorrow.",
             "Update the record to {v}, thanks!", "{v}", "Customer wrote: 'use {v} from now on'",
             "Bitte überweisen Sie auf {v}.", "Merci d'utiliser {v} pour le paiement."]


def card(rng, valid=True):
    prefix, n = rng.choice(CARD_PREFIXES)
    body = prefix + "".join(rng.choice(string.digits) for _ in range(n - len(prefix) - 1))
    check = next(d for d in string.digits if luhn_ok(body + d))
    digits = body + check
    if not valid:
        i = rng.randrange(len(prefix), n)
        digits = digits[:i] + str((int(digits[i]) + rng.randrange(1, 10)) % 10) + digits[i + 1:]
        assert not luhn_ok(digits)
    sep = rng.choice(["", " ", "-"])
    groups = [4, 6, 5] if n == 15 else [4] * (n // 4) + ([n % 4] if n % 4 else [])
    out, pos = [], 0
    for g in groups:
        out.append(digits[pos:pos + g])
        pos += g
    return sep.join(out)


def iban(rng, valid=True):
    country = rng.choice(list(IBAN_SPECS))
    bban = ""
    for kind, count in re.findall(r"([anc])(\d+)", IBAN_SPECS[country]):
        pool = {"a": string.ascii_uppercase, "n": string.digits, "c": string.ascii_uppercase + string.digits}[kind]
        bban += "".join(rng.choice(pool) for _ in range(int(count)))
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    s = f"{country}{98 - num % 97:02d}{bban}"
    if not valid:
        i = rng.choice([j for j in range(4, len(s)) if s[j].isdigit()])
        s = s[:i] + str((int(s[i]) + rng.randrange(1, 10)) % 10) + s[i + 1:]
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4)) if rng.random() < 0.5 else s


def email(rng):
    user = f"{rng.choice(FIRST)}{rng.choice(['.', '_', ''])}{rng.choice(FIRST)}{rng.randrange(100)}"
    return f"{user}@{rng.choice(DOMAINS)}"


def phone(rng):
    while True:
        region = rng.choice(REGIONS)
        ex = phonenumbers.example_number_for_type(region, rng.choice([phonenumbers.PhoneNumberType.MOBILE,
                                                                       phonenumbers.PhoneNumberType.FIXED_LINE]))
        if ex is None:
            continue
        s = str(ex.national_number)
        keep = max(3, len(s) - 4)
        ex.national_number = int(s[:keep] + "".join(rng.choice(string.digits) for _ in range(len(s) - keep)))
        if not phonenumbers.is_valid_number(ex):
            continue
        fmt = rng.choice([phonenumbers.PhoneNumberFormat.E164, phonenumbers.PhoneNumberFormat.INTERNATIONAL,
                          phonenumbers.PhoneNumberFormat.NATIONAL])
        text = phonenumbers.format_number(ex, fmt)
        if fmt == phonenumbers.PhoneNumberFormat.NATIONAL and region not in ("US", "GB", "DE", "FR", "IN"):
            continue  # national formats are only readable with the region known; the guard's default regions
        return text


def lookalike(rng):
    d = lambda k: "".join(rng.choice(string.digits) for _ in range(k))
    h = lambda k: "".join(rng.choice("0123456789abcdef") for _ in range(k))
    y, m, day = rng.randrange(1990, 2030), rng.randrange(1, 13), rng.randrange(1, 29)
    return rng.choice([
        f"Order ORD-{y}-{d(6)} has shipped.", f"Invoice INV {y}{m:02d}{day:02d}-{d(4)} is due.",
        f"Meeting on {y}-{m:02d}-{day:02d} at {rng.randrange(24):02d}:{rng.randrange(60):02d}.",
        f"Released {day:02d}/{m:02d}/{y} as version {rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(30)}.",
        f"Total: ${rng.randrange(1, 99)},{d(3)}.{d(2)} incl. VAT", f"ISBN 978-{d(1)}-{d(2)}-{d(6)}-{d(1)}",
        f"Scan barcode {d(13)} at the till.", f"Location {rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}",
        f"commit {h(40)}", f"Tracking 1Z{d(3)}AA{d(10)}", f"Ticket #{d(8)} was closed.", f"pi is about 3.{d(12)}",
        f"Build {y}.{m}.{day}.{d(4)} passed", f"Room {d(3)}, floor {d(1)}, badge {d(6)}",
        f"Serial SN{d(4)}-{d(4)}-{d(4)}", f"Population grew from {d(1)},{d(3)},{d(3)} to {d(1)},{d(3)},{d(3)}.",
        f"uuid {h(8)}-{h(4)}-{h(4)}-{h(4)}-{h(12)}", f"Call reference {d(5)}-{d(2)} when you phone."])


def build(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(labelled records with PII, look-alike records without)."""
    rng = random.Random(seed)
    gens = {"card": card, "iban": iban, "email": email, "phone": phone,
            "ipv4": lambda r: ".".join(str(r.randrange(1, 255)) for _ in range(4)),
            "ipv6": lambda r: ":".join(f"{r.randrange(65536):x}" for _ in range(8)),
            "ssn": lambda r: f"{r.randrange(1, 665):03d}-{r.randrange(1, 100):02d}-{r.randrange(1, 10000):04d}"}
    records, negatives = [], []
    for t, gen in gens.items():
        for _ in range(n):
            v = gen(rng)
            tpl = rng.choice(TEMPLATES)
            text = tpl.format(v=v)
            s = text.index(v)
            records.append({"text": text, "entities": [{"type": t, "start": s, "end": s + len(v)}], "kind": t})
    for _ in range(n):  # invalid cards and IBANs: look like PII, are not
        for gen in (card, iban):
            negatives.append({"text": rng.choice(TEMPLATES).format(v=gen(rng, valid=False)), "entities": [],
                              "kind": f"invalid_{gen.__name__}"})
    for _ in range(4 * n):
        negatives.append({"text": lookalike(rng), "entities": [], "kind": "lookalike"})
    return records, negatives


# the baseline: the candidate patterns alone, as a regex-only scrubber would use them
BARE = {"email": r"\S+@\S+\.\w+", "card": r"\b(?:\d[ -]?){13,19}\b", "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
        "phone": r"\+?\d[\d ().-]{6,}\d", "ipv4": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
        "ipv6": r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b", "ssn": r"\b\d{3}-\d{2}-\d{4}\b"}


class BareGuard:
    def __init__(self):
        self.pats = {t: re.compile(p) for t, p in BARE.items()}

    def scan(self, text):
        out = []
        for t, p in self.pats.items():
            out += [Finding(t, m.start(), m.end(), m.group()) for m in p.finditer(text)]
        from llmkit.trust.guard import resolve_overlaps

        return resolve_overlaps(out)


def measure(guard, records, negatives, repeats):
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = evaluate_guard(guard, records + negatives)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    by_kind = {}
    for r in negatives:
        by_kind.setdefault(r["kind"], []).append(bool(guard.scan(r["text"])))
    size = sum(len(r["text"].encode()) for r in records + negatives)
    res["false_positive_rate"] = {k: round(sum(v) / len(v), 4) for k, v in by_kind.items()}
    res["mb_per_s"] = round(size / 1e6 / best, 3)
    res["seconds"] = round(best, 3)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="records per PII type (look-alikes: 4x)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes each (best counts), alternating")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guard_pii.json"))
    args = ap.parse_args()
    records, negatives = build(args.n)
    ours, base = Guard(), BareGuard()
    res_ours = res_base = None
    for _ in range(args.repeats):  # alternate so both see the same machine load
        r = measure(ours, records, negatives, 1)
        res_ours = r if res_ours is None or r["mb_per_s"] > res_ours["mb_per_s"] else res_ours
        r = measure(base, records, negatives, 1)
        res_base = r if res_base is None or r["mb_per_s"] > res_base["mb_per_s"] else res_base
    rec = lambda t: res_ours["per_type"].get(t, {}).get("recall", 0.0)
    targets = {"card_recall>=0.99": rec("card") >= 0.99, "iban_recall>=0.99": rec("iban") >= 0.99,
               "email_recall>=0.99": rec("email") >= 0.99,
               "lookalike_fp<=0.01": res_ours["false_positive_rate"]["lookalike"] <= 0.01}
    result = {"benchmark": "guard_pii", "n_records": len(records), "n_negatives": len(negatives),
              "llmkit": res_ours, "baseline_bare_patterns": res_base, "targets_met": targets,
              "speed_ratio_baseline_over_llmkit": round(res_base["mb_per_s"] / res_ours["mb_per_s"], 2),
              "note": "machine shared with other jobs: absolute MB/s are low, compare within the run",
              "command": " ".join(["benchmarks/guard_pii.py", *sys.argv[1:]])}
    write_results(args.out, result)
    print(f"{'type':<8} {'P':>7} {'R':>7} | bare P {'':>3} R")
    for t in sorted(set(res_ours["per_type"]) | set(res_base["per_type"])):
        o, b = res_ours["per_type"].get(t, {}), res_base["per_type"].get(t, {})
        print(f"{t:<8} {o.get('precision', 0):7.4f} {o.get('recall', 0):7.4f} | {b.get('precision', 0):7.4f} "
              f"{b.get('recall', 0):7.4f}")
    print("false positives (records with any finding):", res_ours["false_positive_rate"], "bare:",
          res_base["false_positive_rate"])
    print(f"MB/s: llmkit {res_ours['mb_per_s']}, bare patterns {res_base['mb_per_s']}; targets: {targets}")


if __name__ == "__main__":
    main()
