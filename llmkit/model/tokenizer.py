"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, plus chat templates and streaming decode.

Reads and writes the Hugging Face folder layout (tokenizer.json + tokenizer_config.json + special_tokens_map.json),
so `transformers.AutoTokenizer.from_pretrained(folder)` loads what we save and encodes identically. It can also be
built from a GGUF file's metadata, the way llama.cpp and transformers' GGUF loader read it.
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from llmkit.utils.io import write_atomic

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token")
# Tokens chat models emit to end their turn; a generation should stop on any of them, not only on `eos`.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>", "</s>")

# llama.cpp's `tokenizer.ggml.pre` names -> how text is split before BPE (llama.cpp src/llama-vocab.cpp).
GPT2_SPLIT = None  # ByteLevel's own GPT-2 regex
DIGITS_THEN_GPT2 = "digits"  # one digit per piece, then GPT-2's regex: SmolLM, StarCoder, ...
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS = {
    "default": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "gpt-2": GPT2_SPLIT, "mpt": GPT2_SPLIT, "olmo": GPT2_SPLIT,
    "smollm": DIGITS_THEN_GPT2, "starcoder": DIGITS_THEN_GPT2, "refact": DIGITS_THEN_GPT2,
    "command-r": DIGITS_THEN_GPT2, "codeshell": DIGITS_THEN_GPT2, "exaone": DIGITS_THEN_GPT2,
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "falcon3": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "megrez": QWEN2_SPLIT,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, the alphabet byte-level BPE vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _content(token) -> str | None:
    """A special token as HF configs store it: a string or a {"content": ...} dict."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Text <-> token ids, special tokens, and the model's chat template."""

    def __init__(self, hf_tokenizer: HFTokenizer, bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                 mask_token=None, cls_token=None, sep_token=None, chat_template=None, add_bos_token=None,
                 add_eos_token=None, padding_side="left", model_max_length=None):
        self.hf = hf_tokenizer
        given = dict(zip(SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token, mask_token, cls_token, sep_token)))
        self.special_tokens = {name: _content(tok) for name, tok in given.items() if tok is not None}
        missing = [t for t in self.special_tokens.values() if self.hf.token_to_id(t) is None]
        if missing:  # like transformers: a named special token absent from the vocabulary gets appended
            self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        # An explicit add_bos/eos_token rewrites the post-processor, as transformers' update_post_processor does;
        # left unset (None), the post-processor in tokenizer.json (e.g. BERT's [CLS] ... [SEP]) is kept.
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor()

    def _set_post_processor(self) -> None:
        """Make encode(add_special_tokens=True) prepend bos / append eos per add_bos_token / add_eos_token."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = bool(self.add_bos_token and bos), bool(self.add_eos_token and eos)
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(t, self.hf.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.hf.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json), ours or transformers'."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}: pass a folder saved by llmkit or transformers")
        hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        read = lambda name: json.loads((path / name).read_text("utf-8")) if (path / name).is_file() else {}
        config, special_map = read("tokenizer_config.json"), read("special_tokens_map.json")
        # Added tokens listed only in the config (rare, older transformers) must exist before ids are looked up.
        for _, tok in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if hf.token_to_id(tok["content"]) is None:
                flags = {k: tok[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in tok}
                hf.add_tokens([AddedToken(tok["content"], **flags)])
        chat_template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.43 saves the template beside the config
            chat_template = (path / "chat_template.jinja").read_text("utf-8")
        elif isinstance(chat_template, list):  # several named templates: use the default one
            named = {t["name"]: t["template"] for t in chat_template}
            chat_template = named.get("default", next(iter(named.values()), None))
        specials = {name: _content(config.get(name) or special_map.get(name)) for name in SPECIAL_NAMES}
        return cls(hf, **specials, chat_template=chat_template, add_bos_token=config.get("add_bos_token"),
                   add_eos_token=config.get("add_eos_token"), padding_side=config.get("padding_side", "left"),
                   model_max_length=config.get("model_max_length"))

    def save(self, out_dir) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout) atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.hf.get_added_tokens_decoder().items())
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, **self.special_tokens,
                  "clean_up_tokenization_spaces": False, "padding_side": self.padding_side}
        for key in ("add_bos_token", "add_eos_token", "model_max_length", "chat_template"):
            if getattr(self, key) is not None:  # unset keys stay unset so transformers keeps tokenizer.json's behaviour
                config[key] = getattr(self, key)
        write_atomic(out / "tokenizer.json", self.hf.to_str(pretty=True))
        write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        write_atomic(out / "special_tokens_map.json", json.dumps(self.special_tokens, indent=2, ensure_ascii=False))

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes in its tokenizer.ggml.* metadata (BPE or SentencePiece)."""
        import gguf  # only needed here; importing it is not free

        reader = path_or_reader
        if not isinstance(reader, gguf.GGUFReader):
            if not Path(reader).is_file():
                raise FileNotFoundError(f"GGUF file not found: {reader}")
            reader = gguf.GGUFReader(str(reader))
        meta = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default
        kind = meta("tokenizer.ggml.model")
        tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type") or []
        if kind == "gpt2":
            if "tokenizer.ggml.merges" not in reader.fields:
                raise ValueError("GGUF has a BPE vocabulary but no tokenizer.ggml.merges: re-convert it with llama.cpp")
            hf = _byte_level_bpe(tokens, meta("tokenizer.ggml.merges"), meta("tokenizer.ggml.pre", "default"))
            default_add_bos = False
        elif kind == "llama":
            scores, prefix = meta("tokenizer.ggml.scores"), meta("tokenizer.ggml.add_space_prefix", True)
            hf = _sentencepiece_bpe(tokens, scores, prefix)
            default_add_bos = True  # llama.cpp and transformers add BOS for SentencePiece vocabularies by default
        else:
            raise ValueError(f"unsupported GGUF tokenizer type {kind!r}: llmkit reads 'gpt2' (BPE) and 'llama' "
                             "(SentencePiece); convert the model with its tokenizer.json instead")
        # Control tokens (<|im_start|>) stay whole and are special; user-defined ones (<think>) stay whole, not special.
        alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                               if ty == GGUF_CONTROL and (alphabet is None or set(t) <= alphabet)])
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                       if ty == GGUF_USER_DEFINED])
        name = lambda key: tokens[meta(key)] if meta(key) is not None and meta(key) < len(tokens) else None
        return cls(hf, bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
                   unk_token=name("tokenizer.ggml.unknown_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
                   chat_template=meta("tokenizer.chat_template"),
                   add_bos_token=meta("tokenizer.ggml.add_bos_token", default_add_bos),
                   add_eos_token=meta("tokenizer.ggml.add_eos_token", False))

    # ---------------------------------------------------------------- encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens applies the post-processor (BOS/EOS, [CLS]/[SEP]) like transformers."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be padded larger)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, or None."""
        return self.hf.id_to_token(int(i))

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.hf.token_to_id(token)

    bos_id = property(lambda self: self._special_id("bos_token"), doc="Id of the BOS token, or None.")
    eos_id = property(lambda self: self._special_id("eos_token"), doc="Id of the EOS token, or None.")
    pad_id = property(lambda self: self._special_id("pad_token"), doc="Id of the padding token, or None.")
    unk_id = property(lambda self: self._special_id("unk_token"), doc="Id of the unknown token, or None.")
    mask_id = property(lambda self: self._special_id("mask_token"), doc="Id of the mask token, or None.")
    cls_id = property(lambda self: self._special_id("cls_token"), doc="Id of the CLS token, or None.")
    sep_id = property(lambda self: self._special_id("sep_token"), doc="Id of the SEP token, or None.")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens and of every added token marked special."""
        ids = {self._special_id(name) for name in self.special_tokens}
        ids |= {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        return sorted(i for i in ids if i is not None)

    def chat_stop_ids(self) -> list[int]:
        """Ids that end an assistant turn: eos plus any of <|im_end|>, <|eot_id|>, <|endoftext|>, ... in the vocab."""
        ids = [self.eos_id] + [self.hf.token_to_id(t) for t in TURN_END_TOKENS]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---------------------------------------------------------------- chat template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            **extra) -> str | list[int]:
        """Render messages with the model's own Jinja chat template, exactly as transformers does; ids if tokenize."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template: use a chat (instruct) model or plain text prompts")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation: pass at least one message")
        # transformers drops None values (OpenAI-style content=None) because templates handle a missing key better
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **extra}  # bos_token etc. are visible to the template, as in transformers
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        render = lambda msgs: _compile_template(self.chat_template).render(
            messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
        if tokenize and self._smuggles(messages):
            return self._encode_guarded(messages, render)
        text = render(messages)
        # The template already writes BOS if the model wants it, so no special tokens are added (as in transformers).
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _smuggles(self, messages) -> bool:
        added = [t.content for t in self.hf.get_added_tokens_decoder().values()]
        return any(isinstance(m.get("content"), str) and any(t in m["content"] for t in added) for m in messages)

    def _encode_guarded(self, messages, render) -> list[int]:
        """Ids of the rendered conversation with message content encoded as plain text, so a user's
        `<|im_start|>system` stays text instead of becoming control tokens (the template's own ones stay special)."""
        import secrets

        nonce = secrets.token_hex(4)
        mark = lambda i: f"\ue000{nonce}:{i}\ue001"
        contents = [m["content"] if isinstance(m.get("content"), str) else None for m in messages]
        marked = [{**m, "content": mark(i)} if c is not None else m for i, (m, c) in enumerate(zip(messages, contents))]
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", render(marked))
        if len(parts) != 2 * sum(c is not None for c in contents) + 1:
            raise ValueError("message content contains control-token strings and this chat template transforms "
                             "content, so it cannot be kept as plain text; remove the special tokens from the message")
        if getattr(self, "_plain", None) is None:  # a copy that encodes special-token strings as ordinary text
            self._plain = HFTokenizer.from_str(self.hf.to_str())
            self._plain.encode_special_tokens = True
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids += self._plain.encode(contents[int(part)], add_special_tokens=False).ids
            elif part:
                ids += self.encode(part, add_special_tokens=False)
        return ids

    def __repr__(self) -> str:
        has_template = self.chat_template is not None
        return f"Tokenizer(vocab_size={self.vocab_size}, {self.special_tokens}, chat_template={has_template})"


class StreamDecoder:
    """Incremental detokenizer: push token ids one at a time, get text that never splits a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        # Decode a short window [prefix:] and emit only what lies past [prefix:read]: decoding tokens one by one would
        # lose SentencePiece's leading spaces and break characters that span tokens (emoji, CJK in byte-level BPE).
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        done = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(text) > len(done) and not text.endswith("\ufffd"):  # U+FFFD: the last bytes are not a full character
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character comes out as U+FFFD)."""
        done = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


# -------------------------------------------------------------------- builders


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    """GPT-2 style byte-level BPE from a GGUF vocabulary, split the way llama.cpp's `pre` type says."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few files store tokens as raw text instead of in the byte alphabet; respell them (as transformers does).
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    hf = HFTokenizer(BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False))
    split = GGUF_PRE_SPLITS.get(pre, GPT2_SPLIT)  # unknown names fall back to GPT-2's regex, as transformers does
    if split is GPT2_SPLIT:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == DIGITS_THEN_GPT2:  # what SmolLM2's own tokenizer.json contains
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if split is QWEN2_SPLIT:
            hf.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes to NFC first
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens: list[str], scores: list[float], add_space_prefix: bool) -> HFTokenizer:
    """Llama/Mistral SentencePiece BPE from a GGUF vocabulary; merges are recovered from the token scores."""
    vocab = {t: i for i, t in enumerate(tokens)}
    # A token that two vocabulary pieces join into is a merge; better-scored tokens merge first (sentencepiece's rule).
    merges = [(t[:k], t[k:], s, i) for i, (t, s) in enumerate(zip(tokens, scores))
              for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1]), m[3], vocab[m[0]], vocab[m[1]]))  # transformers' order
    unk = "<unk>" if "<unk>" in vocab else None
    hf = HFTokenizer(BPE(vocab, [(a, b) for a, b, _, _ in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
    scheme = "first" if add_space_prefix else "never"  # "▁" before the first word only, as in LlamaTokenizer
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_space_prefix else []))
    return hf


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in the sandboxed Jinja environment transformers uses (same options and helpers)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we keep the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
