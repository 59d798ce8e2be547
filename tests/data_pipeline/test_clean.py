"""`llmkit data clean` on datatrove: normalisation, exact and near de-duplication, quality rules, language, PII,
the CLI, pretrain/finetune --clean."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document  # noqa: E402

from llmkit.data.clean import CleanConfig, normalize_text  # noqa: E402
from llmkit.data.pipeline import RunConfig, bucket_plan, run_clean  # noqa: E402
from llmkit.data.steps import C4, DigitRatio, Gopher, GopherRepetition, Words  # noqa: E402

DATA = Path(__file__).parents[1] / "data"
WORDS = ("river city music station history war album season species road film court village game ship church "
         "player team league series county island bridge school north south east west early late major minor "
         "first second third great small new old local national royal public open").split()


def doc(rng, n=80):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def clean_texts(tmp_path, texts, cfg, **run):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rep = run_clean([src], out, cfg, RunConfig(**run))
    return [json.loads(x)["text"] for x in out.read_text().splitlines()], rep


def test_normalize_nfkc_controls_and_whitespace():
    assert normalize_text("ｆｕｌｌ\u00a0width\tand   spaces \x07bell\u200b ok\r\n\n\n\nnext  ") == \
        "full width and spaces bell ok\n\nnext"
    assert normalize_text("ﬁne café") == "fine café"


def test_exact_and_near_duplicates(tmp_path):
    rng = random.Random(0)
    base = [doc(rng) for _ in range(30)]
    near = []
    for d in base[:10]:  # change one word in 80: Jaccard of 5-word shingles ~0.9
        w = d.split()
        w[40] = "zebra"
        near.append(" ".join(w))
    texts = base + [base[3], base[7]] + near
    kept, rep = clean_texts(tmp_path, texts, CleanConfig(dedup=["exact", "near"]))
    assert rep["removed"] == {"exact_duplicate": 2, "near_duplicate": 10}
    assert kept == base
    kept, rep = clean_texts(tmp_path, texts, CleanConfig(dedup=["exact"]))
    assert len(kept) == 40 and rep["removed"] == {"exact_duplicate": 2}


def test_near_duplicate_decision_follows_true_jaccard(tmp_path):
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig

    b, r, cut = bucket_plan(0.8, 256)
    assert 0.7 < cut < 0.8 and b * r <= 256
    for j in (0.8, 0.85):  # a pair at the threshold is a candidate (same bucket) >= 99.9 % of the time
        assert 1 - (1 - j ** r) ** b > 0.999
    mh = MinhashDedupSignature(str(tmp_path), MinhashConfig(num_buckets=b, hashes_per_bucket=r,
                                                       hash_config=HashConfig(hash_fc="sha1")), language=Words())

    def sig(words):
        return np.concatenate(mh.get_signature(mh.get_shingles(" ".join(words))))

    rng = random.Random(1)
    a = [rng.choice(WORDS) + chr(97 + rng.randrange(26)) for _ in range(200)]

    def shingles(w):
        return {" ".join(w[i:i + 5]) for i in range(len(w) - 4)}

    decided = []
    for k in (2, 4, 20, 60):  # words changed
        w = list(a)
        for i in rng.sample(range(200), k):
            w[i] = "q" + chr(97 + i % 26) * (1 + i // 26)
        j = len(shingles(a) & shingles(w)) / len(shingles(a) | shingles(w))
        est = float(np.mean(sig(a) == sig(w)))
        assert abs(est - j) < 0.12  # standard error ~0.03 with 255 hashes
        decided.append((j, est >= cut))
    assert decided[0][1] and not decided[-1][1]


def test_gopher_and_c4_rules():
    rng = random.Random(3)
    varied = " ".join(rng.choice(WORDS) for _ in range(120)) + " and the river of the city that was to have been."

    def verdict(step, text):
        d = Document(text=text, id="0")
        kept = step.filter(d)
        return (None if kept is True else kept[1]), d.text

    gopher, rep, c4 = Gopher(), GopherRepetition(), C4()
    assert verdict(gopher, varied)[0] is None and verdict(rep, varied)[0] is None
    assert verdict(gopher, "too short text")[0] == "gopher_short_doc"
    assert verdict(gopher, "# " * 60 + varied)[0] == "gopher_too_many_hashes"
    assert verdict(DigitRatio(), " ".join(["1234 5678"] * 60) + " the and of")[0] == "digit_ratio"
    bullets = "\n".join(["- " + rng.choice(WORDS) + " the of with" for _ in range(60)])
    assert verdict(gopher, bullets)[0] == "gopher_too_many_bullets"
    assert verdict(rep, "\n".join([varied] * 3))[0] == "gopher_dup_para_frac" or \
        verdict(rep, "\n".join([varied] * 3))[0].startswith("gopher_dup")
    page = ("First line is a sentence here. Second one too! Third? Yes it is. Fourth line ends. Fifth too.\n"
            "Click here\nPlease enable JavaScript to view this page.\nRead our privacy policy for details.")
    assert verdict(c4, page) == (None, page.split("\n")[0])
    assert verdict(c4, "Lorem ipsum dolor sit amet. " * 6)[0] == "c4_lorem_ipsum"
    assert verdict(c4, "function f() { return 1; }. " * 6)[0] == "c4_curly_bracket"
    assert verdict(c4, "One sentence only.")[0] == "c4_few_sentences"


def test_language_and_pii_and_min_chars(tmp_path):
    texts = ["The weather is lovely today and we are going for a long walk in the park.",
             "Das Wetter ist heute schön und wir machen einen langen Spaziergang im Park.",
             "Le temps est magnifique aujourd'hui et nous allons faire une longue promenade.",
             "Write to john.doe@example.com or call +44 20 7946 0958 for the tickets.",
             "tiny"]
    kept, rep = clean_texts(tmp_path, texts, CleanConfig(langs=["en"], pii="redact", min_chars=10, dedup=[]))
    assert kept == [texts[0], "Write to [EMAIL] or call [PHONE] for the tickets."]
    assert rep["removed"] == {"min_chars": 1, "language": 2} and rep["pii"] == {"email": 1, "phone": 1}
    assert set(rep["languages_removed"]) == {"de", "fr"}


def test_no_step_downloads_anything(tmp_path, monkeypatch):
    """Every rule on, the network refused (in this process: one worker), py3langid's shipped model and the local
    word splitter for Gopher/C4."""
    import socket

    connect = socket.socket.connect

    def refuse(self, *a, **k):  # local (AF_UNIX) sockets stay: multiprocessing uses them
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError("a pipeline step tried to reach the network")
        return connect(self, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    rng = random.Random(4)
    texts = [f"The {doc(rng, 60)} It was the end of the day and we went home. " * 3 for _ in range(6)]
    kept, rep = clean_texts(tmp_path, texts, CleanConfig(quality="both", langs=["en"], pii="redact"), workers=1)
    assert rep["documents_in"] == 6 and "spacy" not in sys.modules and "nltk" not in sys.modules


def llmkit(*args):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_reads_formats_and_writes_a_report(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    docs = [doc(rng, 60) for _ in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:10] + docs[:3]) + "\n")
    (tmp_path / "b.csv").write_text("id,text\n" + "\n".join(f'{i},"{d}"' for i, d in enumerate(docs[10:15])) + "\n")
    pq.write_table(pa.table({"text": docs[15:] + [docs[0]]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text(DATA.joinpath("wikitext2_test_excerpt.txt").read_text())
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.json"
    r = llmkit("data", "clean", *(str(tmp_path / f) for f in ("a.jsonl", "b.csv", "c.parquet", "d.txt")),
               "--out", str(out), "--report", str(rep), "--pii", "redact", "--tasks", "2", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "Launching pipeline" not in r.stderr  # datatrove's task logs go to the work folder, not the terminal
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    report = json.loads(rep.read_text())
    assert kept[:20] == docs and report["removed"]["exact_duplicate"] == 4
    assert report["documents_in"] == len(kept) + sum(report["removed"].values())
    assert report["bytes_out"] <= report["bytes_in"] and report["executor"]["tasks"] == 2
    assert not list(tmp_path.glob(".out.jsonl*"))  # the work folder is gone


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (b"ok line\ncaf\xe9\n", "not UTF-8 (line 2)")])
def test_cli_bad_input_is_one_line_and_leaves_no_output(tmp_path, content, needle):
    f = tmp_path / "in.txt"
    f.write_bytes(content)
    r = llmkit("data", "clean", str(f), "--out", str(tmp_path / "out.txt"))
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.txt").exists() and not list(tmp_path.glob(".out.txt*"))
    r = llmkit("data", "clean", str(DATA / "wikitext2_test_excerpt.txt"), "--out", str(tmp_path / "o.txt"),
               "--near-threshold", "1.5")
    assert r.returncode == 2 and "--near-threshold" in r.stderr
    r = llmkit("data", "clean", str(DATA / "wikitext2_test_excerpt.txt"), "--out", str(tmp_path / "o.txt"),
               "--executor", "ray")
    assert r.returncode == 2 and "--work-dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pretrain_clean_flag_cleans_the_data_first(tmp_path):
    from llmkit.cli import main

    text = DATA.joinpath("tinyshakespeare_head.txt").read_text()
    data = tmp_path / "shakes.txt"
    data.write_text(text + "\n" + text)  # the second copy is all duplicates
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(data), "--out", str(out), "--char", "--block-size", "32", "--batch-size", "8",
               "--max-steps", "2", "--eval-steps", "1", "--no-progress", "--n-layer", "1", "--clean",
               "--dedup", "exact"])
    assert rc == 0
    rep = json.loads((out / "clean" / "shakes.report.json").read_text())
    assert rep["removed"]["exact_duplicate"] > 0
    assert (out / "clean" / "shakes.txt").stat().st_size <= len(text) + 2  # one copy left
    assert (out / "config.json").exists()


def test_finetune_clean_flag_cleans_chat_records(tmp_path):
    from llmkit.cli import build_parser
    from llmkit.cli.train import clean_finetune_data

    recs = [{"messages": [{"role": "user", "content": "My mail is bob@example.com"},
                          {"role": "assistant", "content": "Noted,   thanks."}]}] * 2
    recs.append({"messages": [{"role": "user", "content": "ｈｉ"}, {"role": "assistant", "content": "Hello!"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    args = build_parser().parse_args(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), "--clean",
                                      "--pii", "redact"])
    path = clean_finetune_data(args)
    kept = [json.loads(x) for x in Path(path).read_text().splitlines()]
    assert kept == [{"messages": [{"role": "user", "content": "My mail is [EMAIL]"},
                                  {"role": "assistant", "content": "Noted, thanks."}]},
                    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}]
    rep = json.loads((tmp_path / "ft" / "clean" / "chat.report.json").read_text())
    assert rep["removed"] == {"exact_duplicate": 1} and rep["pii"] == {"email": 1}


def test_cli_keeps_record_fields_and_report_holds_no_pii(tmp_path):
    rng = random.Random(7)
    docs = [doc(rng, 60) + f" Mail bob{i}@example.com or call SSN 123456789." for i in range(4)]
    recs = [{"id": i, "url": f"https://example.org/{i}", "source": "web", "text": d, "meta": {"lang": "en"}}
            for i, d in enumerate(docs)]
    src, out, rep = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.json"
    src.write_text("\n".join(json.dumps(r) for r in recs + recs[:2]) + "\n")  # two exact duplicates
    r = llmkit("data", "clean", str(src), "--out", str(out), "--report", str(rep), "--pii", "redact")
    assert r.returncode == 0, r.stderr
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "text"} for x in kept] == [
        {k: v for k, v in x.items() if k != "text"} for x in recs]
    assert all("[EMAIL]" in x["text"] and "[SSN]" in x["text"] for x in kept)
    report = rep.read_text()
    assert json.loads(report)["removed"]["exact_duplicate"] == 2
    assert "@example.com" not in report and "123456789" not in report
