"""The guard: a content policy from YAML, actions on text (refuse, redact, mask, hash, flag), a streaming output
guard, the server's per-request guard, and measuring a policy. PII recognisers and normalised matching:
llmkit.trust.pii.

A Guard checks inputs whole and outputs as a stream: StreamGuard holds back the last `holdback` characters (and any
match still growing) the way the engine holds back a possible stop string, so a blocked phrase is never sent in part.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.trust.measure import evaluate_guard, read_labeled  # noqa: F401
from llmkit.trust.pii import (IBAN_LENGTHS, PII_TYPES, Finding, TermMatcher, card_brand, email_ok, find_pii,  # noqa: F401
                        iban_ok, luhn_ok, normalise, resolve_overlaps, ssn_ok)

DIRECTION_ACTIONS = ("refuse", "redact", "flag", "allow")
PII_MODES = ("redact", "mask", "hash")
REFUSAL = "I can't help with that request."

# ---------------------------------------------------------------------------------------------------------------
# Policy files


@dataclass
class Category:
    """A content category: block/allow lists, an optional classifier, and what to do on input and output."""
    name: str
    matcher: TermMatcher
    allow: TermMatcher
    input: str = "refuse"
    output: str = "refuse"
    classifier: dict | None = None  # {"model": folder, "threshold": float, "labels": [...] or None}


@dataclass
class Policy:
    """What the guard looks for and what it does (see README: Guard)."""
    pii_types: tuple = PII_TYPES
    terms: list = field(default_factory=list)
    phone_regions: tuple = ("US", "GB", "DE", "FR", "IN")
    pii_mode: str = "redact"  # redact | mask | hash
    pii_input: str = "redact"
    pii_output: str = "redact"
    categories: list = field(default_factory=list)
    refusal_message: str = REFUSAL
    holdback: int = 64  # output characters held back while streaming (longest PII value or phrase)


KEYS = {
    "": {"pii", "categories", "refusal_message", "holdback"},
    "pii": {"types", "terms", "phone_regions", "mode", "input", "output"},
    "category": {"block", "regex", "allow", "input", "output", "classifier"},
    "classifier": {"model", "threshold", "labels"},
}


def load_policy(path) -> Policy:
    """A Policy from a YAML file; unknown keys, bad values and invalid regexes raise ValueError naming the line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"policy file not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
        root = yaml.compose(text)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if root is None:
        raise ValueError(f"{path} is empty: give at least 'pii:' or 'categories:'")
    return _policy_from_node(root, str(path))


def _policy_from_node(root, path: str) -> Policy:
    import yaml

    def err(node, msg):
        return ValueError(f"{path}:{node.start_mark.line + 1}: {msg}")

    def mapping(node, kind, where):
        if not isinstance(node, yaml.MappingNode):
            raise err(node, f"{where or 'the policy'} must be a mapping")
        out = {}
        for k, v in node.value:
            if kind is not None and k.value not in KEYS[kind]:
                allowed = ", ".join(sorted(KEYS[kind]))
                raise err(k, f"unknown key {k.value!r} in {where or 'the policy'} (allowed: {allowed})")
            out[k.value] = v
        return out

    def scalar(node, kind, name):
        v = yaml.safe_load(yaml.serialize(node))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise err(node, f"{name} must be a {kind.__name__}")
        return v

    def strings(node, name):
        if not isinstance(node, yaml.SequenceNode) or not all(isinstance(x, yaml.ScalarNode) for x in node.value):
            raise err(node, f"{name} must be a list of strings")
        return [(str(x.value), x) for x in node.value]

    def action(node, name):
        v = scalar(node, str, name)
        if v not in DIRECTION_ACTIONS:
            raise err(node, f"{name} must be one of {', '.join(DIRECTION_ACTIONS)}, got {v!r}")
        return v

    top = mapping(root, "", "")
    pol = Policy()
    if "refusal_message" in top:
        pol.refusal_message = scalar(top["refusal_message"], str, "refusal_message")
    if "holdback" in top:
        pol.holdback = scalar(top["holdback"], int, "holdback")
        if not 8 <= pol.holdback <= 4096:
            raise err(top["holdback"], "holdback must be between 8 and 4096 characters")
    if "pii" in top:
        pii = mapping(top["pii"], "pii", "pii")
        if "types" in pii:
            types = strings(pii["types"], "pii.types")
            for t, node in types:
                if t not in PII_TYPES:
                    raise err(node, f"unknown PII type {t!r} (known: {', '.join(PII_TYPES)})")
            pol.pii_types = tuple(t for t, _ in types)
        if "terms" in pii:
            pol.terms = [t for t, _ in strings(pii["terms"], "pii.terms")]
        if "phone_regions" in pii:
            import phonenumbers

            regions = strings(pii["phone_regions"], "pii.phone_regions")
            for r, node in regions:
                if r.upper() not in phonenumbers.SUPPORTED_REGIONS:
                    raise err(node, f"unknown phone region {r!r}: use ISO 3166 codes such as US, GB, DE")
            pol.phone_regions = tuple(r.upper() for r, _ in regions)
        if "mode" in pii:
            pol.pii_mode = scalar(pii["mode"], str, "pii.mode")
            if pol.pii_mode not in PII_MODES:
                raise err(pii["mode"], f"pii.mode must be one of {', '.join(PII_MODES)}")
        pol.pii_input = action(pii["input"], "pii.input") if "input" in pii else pol.pii_input
        pol.pii_output = action(pii["output"], "pii.output") if "output" in pii else pol.pii_output
    if "categories" in top:
        for name_node, node in mapping(top["categories"], None, "categories").items():
            pol.categories.append(_category(name_node, node, mapping, strings, scalar, action, err))
    return pol


def _category(name, node, mapping, strings, scalar, action, err) -> Category:
    c = mapping(node, "category", f"category {name!r}")
    block = [p for p, _ in strings(c["block"], f"{name}.block")] if "block" in c else []
    regexes = strings(c["regex"], f"{name}.regex") if "regex" in c else []
    for r, rnode in regexes:
        try:
            re.compile(r)
        except re.error as e:
            raise err(rnode, f"invalid regex {r!r} in {name}.regex: {e}") from None
    allow = [p for p, _ in strings(c["allow"], f"{name}.allow")] if "allow" in c else []
    clf = None
    if "classifier" in c:
        k = mapping(c["classifier"], "classifier", f"{name}.classifier")
        if "model" not in k:
            raise err(c["classifier"], f"{name}.classifier needs 'model': a classifier folder")
        clf = {"model": scalar(k["model"], str, "model"),
               "threshold": scalar(k["threshold"], float, "threshold") if "threshold" in k else 0.5,
               "labels": [x for x, _ in strings(k["labels"], "labels")] if "labels" in k else None}
        if not 0 < clf["threshold"] <= 1:
            raise err(k["threshold"], "threshold must be in (0, 1]")
    if not block and not regexes and clf is None:
        raise err(node, f"category {name!r} needs 'block', 'regex' or 'classifier'")
    return Category(name, TermMatcher(block, [r for r, _ in regexes]), TermMatcher(allow),
                    action(c["input"], f"{name}.input") if "input" in c else "refuse",
                    action(c["output"], f"{name}.output") if "output" in c else "refuse", clf)


# ---------------------------------------------------------------------------------------------------------------
# The guard


@dataclass
class Verdict:
    """Result of checking one text: the text to use (redacted), the findings, and the action taken."""
    text: str
    findings: list
    action: str  # allow | flag | redact | refuse
    categories: list  # categories (and "pii") that fired

    @property
    def refused(self) -> bool:
        return self.action == "refuse"


RANK = {"allow": 0, "flag": 1, "redact": 2, "refuse": 3}


class Guard:
    """Checks texts against a Policy; counts findings per (category, direction, action) for /metrics."""

    def __init__(self, policy: Policy | None = None, hash_key: bytes | None = None):
        self.policy = policy or Policy()
        self.terms = TermMatcher(self.policy.terms)
        self.key = hash_key if hash_key is not None else os.urandom(16)  # hashes are consistent within a run
        self.counts: Counter = Counter()
        self.review = None  # a llmkit.trust.review.ReviewQueue: texts the policy flags are queued for people
        # the stream guard's holdback in normalised characters: the longest match a block/allow list or term can
        # make (a regex without a bound, `\s+`, is covered up to holdback characters)
        widths = [self.terms.longest] + [m.longest for c in self.policy.categories for m in (c.matcher, c.allow)]
        self.reach = max([self.policy.holdback] + [w for w in widths if w is not None])
        self._classifiers = {}
        for c in self.policy.categories:
            if c.classifier:
                self._classifiers[c.name] = _load_classifier(c.classifier["model"])

    @classmethod
    def from_file(cls, path) -> "Guard":
        """A Guard for a policy YAML file."""
        return cls(load_policy(path))

    def scan(self, text: str, classify: bool = True) -> list[Finding]:
        """Every finding in text: PII, policy matches (minus allowed phrases) and, if classify, classifier hits."""
        pol = self.policy
        out = find_pii(text, pol.pii_types, self.terms, pol.phone_regions)
        norm = normalise(text) if pol.categories else None
        for c in pol.categories:
            allowed = c.allow.spans(text, norm)
            for s, e in c.matcher.spans(text, norm):
                if not any(a <= s and e <= b for a, b in allowed):
                    out.append(Finding(c.name, s, e, text[s:e], 1.0, c.name))
            if classify and c.name in self._classifiers and text.strip():
                score = self._classify(c, text)
                if score >= c.classifier["threshold"]:
                    out.append(Finding(c.name, 0, len(text), text, score, c.name))
        return sorted(out, key=lambda f: (f.start, -f.end))

    def _classify(self, c: Category, text: str) -> float:
        from llmkit.infer.classify import predict_proba  # torch: a guard without classifiers never loads it

        model, tok, names = self._classifiers[c.name]
        probs = predict_proba(model, tok, [text], max_length=min(512, model.config.max_position_embeddings))[0]
        wanted = c.classifier["labels"] or names[1:]  # default: every label but the first ("safe"/"negative")
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"classifier labels {unknown} not among the model's labels {names}")
        return max(float(probs[names.index(w)]) for w in wanted)

    def action_for(self, f: Finding, direction: str) -> str:
        pol = self.policy
        if f.category == "pii":
            return pol.pii_input if direction == "input" else pol.pii_output
        c = next(c for c in pol.categories if c.name == f.category)
        return c.input if direction == "input" else c.output

    def check(self, text: str, direction: str = "input") -> Verdict:
        """Check a whole text; returns the redacted text (if any action redacts) and the strongest action."""
        findings = self.scan(text)
        return self._verdict(text, findings, direction)

    def _verdict(self, text, findings, direction) -> Verdict:
        action, fired = "allow", []
        for f in findings:
            a = self.action_for(f, direction)
            if a == "allow":
                continue
            self.counts[(f.category, direction, a)] += 1
            fired.append(f.category)
            action = max(action, a, key=RANK.__getitem__)
        redact = [f for f in findings if self.action_for(f, direction) == "redact"]
        out = self.redact(text, redact) if action != "refuse" else text
        if self.review is not None and action != "refuse" and any(self.action_for(f, direction) == "flag"
                                                                  for f in findings):
            self.review.record(self, text, findings, direction)
        return Verdict(out, findings, action, sorted(set(fired)))

    def redact(self, text: str, findings: list[Finding]) -> str:
        """text with each finding replaced: [TYPE], masked with '*', or a consistent [TYPE_hash] (policy.pii_mode)."""
        parts, pos = [], 0
        for f in resolve_overlaps(findings):
            parts += [text[pos:f.start], self.placeholder(f)]
            pos = f.end
        return "".join(parts) + text[pos:]

    def placeholder(self, f: Finding) -> str:
        label = f.type.upper()
        if f.category != "pii":
            return f"[{label}]"
        mode = self.policy.pii_mode
        if mode == "mask":
            return "".join("*" if c.isalnum() else c for c in f.text)
        if mode == "hash":
            value = re.sub(r"[\s.()-]", "", f.text).lower()  # the same value however it is formatted
            return f"[{label}_{hmac.new(self.key, value.encode(), hashlib.sha256).hexdigest()[:8]}]"
        return f"[{label}]"

    def stream(self) -> "StreamGuard":
        """A StreamGuard for one output."""
        return StreamGuard(self)

    def check_messages(self, messages: list[dict]) -> tuple[list[dict], Verdict | None]:
        """Every message checked as input, whatever its role (a client writes the whole conversation, "assistant"
        turns included): content (a string or text parts), name, tool calls (function name and arguments, read as
        JSON) and tool results. Returns (redacted messages, the refusing Verdict or None)."""
        out = []
        for m in messages:
            m, refused = self.check_tree(m)
            if refused is not None:
                return messages, refused
            out.append(m)
        return out, None

    def check_tree(self, x, key: str | None = None, keys: bool = False):
        """Every string in a JSON-like value (dict keys and values, lists) checked as input: (the value with each
        string redacted, the refusing Verdict or None). Structural fields (`role`, `type`) are left alone; a
        `content` list of text parts is also checked joined (the template joins them); `arguments` strings are
        read as JSON (escapes decoded, keys checked too) when they parse."""
        if isinstance(x, str):
            if not x or key in STRUCTURAL and not keys:
                return x, None
            if key == "arguments":
                return self._check_arguments(x)
            v = self.check(x, "input")
            return (x, v) if v.refused else (v.text, None)
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                nk, refused = self.check_tree(k, "key") if keys and isinstance(k, str) else (k, None)
                nv, refused2 = self.check_tree(v, k, keys) if refused is None else (v, None)
                if refused or refused2:
                    return x, refused or refused2
                out[nk] = nv
            return out, None
        if isinstance(x, (list, tuple)):
            if key == "content":  # text parts: a phrase split over parts is one text to the model
                joined = "".join(p.get("text", "") for p in x if isinstance(p, dict) and isinstance(p.get("text"), str))
                refused = self._refusal(joined)
                if refused is not None:
                    return x, refused
            out = []
            for v in x:
                nv, refused = self.check_tree(v, None, keys)
                if refused is not None:
                    return x, refused
                out.append(nv)
            return out, None
        return x, None

    def _refusal(self, text: str) -> Verdict | None:
        """The refusing Verdict for text, counted, or None (then nothing is counted: the parts are checked next)."""
        if not text:
            return None
        findings = self.scan(text)
        if any(self.action_for(f, "input") == "refuse" for f in findings):
            return self._verdict(text, findings, "input")
        return None

    def _check_arguments(self, s: str):
        """Tool-call arguments: JSON is decoded (so escapes hide nothing), checked whole for refusals and string by
        string for redaction; text that is not JSON is checked as it is."""
        import json

        try:
            obj = json.loads(s)
        except ValueError:
            obj = None
        if not isinstance(obj, (dict, list, str)):
            v = self.check(s, "input")
            return (s, v) if v.refused else (v.text, None)
        refused = self._refusal(json.dumps(obj, ensure_ascii=False))
        if refused is not None:
            return s, refused
        new, refused = self.check_tree(obj, None, True)
        if refused is not None:
            return s, refused
        return (s if new == obj else json.dumps(new, ensure_ascii=False)), None


STRUCTURAL = ("role", "type")  # values fixed by the protocol; checked no further


def _load_classifier(folder: str):
    from llmkit.model.checkpoint import load_model  # torch: as in Guard._classify

    lm = load_model(folder, dtype="float32")
    n = lm.config.num_labels
    if not n or lm.tokenizer is None:
        raise ValueError(f"{folder} is not a classifier (no classification head); give a folder written by "
                         "`llmkit finetune --task classify`")
    names = [(lm.config.id2label or {}).get(str(i), str(i)) for i in range(n)]
    return lm.model.eval(), lm.tokenizer, names


class StreamGuard:
    """Guards an output stream: push(piece) returns the text that is safe to send now; `blocked` says stop."""

    def __init__(self, guard: Guard):
        self.g, self.hold, self.reach = guard, guard.policy.holdback, guard.reach
        self.text = ""  # everything received
        self.sent = 0  # characters of self.text already decided (sent or replaced)
        self.blocked = False
        self.findings: list[Finding] = []
        self.request_id: str | None = None  # recorded with a flagged output (guard.review)
        # a classifier judges the whole output; if it may refuse or redact, nothing can be sent before the end
        self.hold_all = any(c.classifier and c.output in ("refuse", "redact") for c in guard.policy.categories)

    def push(self, piece: str) -> str:
        """Take a piece of model output; return what may be sent ("" while held back, or after a block)."""
        if self.blocked:
            return ""
        self.text += piece
        if self.hold_all:
            return ""
        end = len(self.text)  # held back: `hold` characters (PII) and `reach` normalised ones (block lists)
        return self._release(min(end - self.hold, self._back(end, self.reach, self.sent)), final=False)

    def _back(self, pos: int, need: int, stop: int = 0) -> int:
        """The start of the shortest text[i:pos] with `need` normalised characters (zero-width ones count
        nothing, so no number of them hides a match), or stop when there are fewer."""
        i, n = pos, 0
        while i > stop and n < need:
            i -= 1
            c = self.text[i]
            n += 1 if c.isascii() else len(normalise(c)[0])
        return i

    def finish(self) -> str:
        """The end of the output: check what is held back and return the rest that may be sent."""
        if self.blocked:
            return ""
        out = self._release(len(self.text), final=True)
        if self.g.review is not None and not self.blocked:
            self.g.review.record(self.g, self.text, self.findings, "output", self.request_id)
        return out

    def _release(self, upto: int, final: bool) -> str:
        # matches end after `sent`, so they start after sent - hold (PII) or reach normalised characters before it
        base = max(0, min(self.sent - self.hold, self._back(self.sent, self.reach + 1)))
        window = self.text[base:]
        findings = [f for f in self.g.scan(window, classify=final) if base + f.end > self.sent]
        for f in findings:
            f.start, f.end = f.start + base, f.end + base
        if not final:
            for f in findings:  # a match that touches the held-back part may still grow: hold from its start
                if f.end > upto:
                    upto = min(upto, f.start)
        upto = max(upto, self.sent)
        done = [f for f in findings if f.end <= upto or final]
        acts = {id(f): self.g.action_for(f, "output") for f in done}
        for f in done:
            if acts[id(f)] != "allow":
                self.g.counts[(f.category, "output", acts[id(f)])] += 1
        self.findings += done
        if any(a == "refuse" for a in acts.values()):
            self.blocked = True
            return ""
        if upto <= self.sent:
            return ""
        piece, pos = [], self.sent
        for f in resolve_overlaps([f for f in done if acts[id(f)] == "redact" and f.start >= self.sent]):
            piece += [self.text[pos:f.start], self.g.placeholder(f)]
            pos = f.end
        piece.append(self.text[pos:upto])
        self.sent = max(upto, pos)
        return "".join(piece)

    def wrap(self, pieces):
        """Yield the guarded pieces of an output stream; closes the stream (ends generation) once blocked."""
        for p in pieces:
            out = self.push(p)
            if out:
                yield out
            if self.blocked:
                if hasattr(pieces, "close"):
                    pieces.close()
                return
        out = self.finish()
        if out:
            yield out


# ---------------------------------------------------------------------------------------------------------------
# Server side: one request's guard state (the server only forwards events through it)


class RequestGuard:
    """Guards the n output streams of one server request; a blocked stream ends with reason "content_filter"."""

    def __init__(self, guard: Guard, n: int, request_id: str | None = None):
        self.guard = guard
        self.streams = [guard.stream() for _ in range(n)]
        for s in self.streams:
            s.request_id = request_id
        self.texts = [""] * n
        self.blocked: set[int] = set()

    def events(self, i: int, ev: tuple) -> list[tuple]:
        """The events to pass on for scheduler event ev of stream i (pieces rewritten, late events of a blocked
        stream dropped, ("done", "content_filter") when the guard stops it)."""
        if i in self.blocked:
            return []
        sg, out = self.streams[i], []
        if ev[0] in ("piece", "done"):
            text = sg.push(ev[1]) if ev[0] == "piece" else sg.finish()
            if sg.blocked:
                self.blocked.add(i)
                return [("done", "content_filter")]
            if text:
                self.texts[i] += text
                out.append(("piece", text))
            return out + ([ev] if ev[0] == "done" else [])
        return [ev]

    def finish_reason(self, i: int, reason: str | None) -> str | None:
        return "content_filter" if i in self.blocked else reason

    @property
    def hides_logprobs(self) -> bool:
        """Token logprobs would show redacted or blocked text: withheld when the policy acts on outputs."""
        p = self.guard.policy
        return p.pii_output != "allow" or any(c.output != "allow" for c in p.categories)


def refusal_response(head: dict, message: str, chat: bool, stream: bool):
    """An OpenAI response (or list of SSE chunks) that refuses: the message, finish_reason "content_filter"."""
    if chat:
        if stream:
            base = {**head, "object": "chat.completion.chunk"}
            return [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": message},
                                          "logprobs": None, "finish_reason": None}]},
                    {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                          "finish_reason": "content_filter"}]}]
        choice = {"index": 0, "message": {"role": "assistant", "content": message}, "logprobs": None,
                  "finish_reason": "content_filter"}
        return {**head, "object": "chat.completion", "choices": [choice],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    choice = {"index": 0, "text": message, "logprobs": None, "finish_reason": "content_filter"}
    if stream:
        return [{**head, "choices": [choice]}]
    return {**head, "choices": [choice], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def check_inputs(guard: Guard, items: list, chat: bool) -> Verdict | None:
    """Check chat messages (chat) or prompt strings as inputs, redacting them in place; the refusing Verdict or None."""
    if chat:
        msgs, refused = guard.check_messages(items)
        items[:] = msgs
        return refused
    for k, t in enumerate(items):
        if isinstance(t, str):
            v = guard.check(t, "input")
            if v.refused:
                return v
            items[k] = v.text
    return None
