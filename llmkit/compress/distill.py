"""Knowledge distillation: a student learns a teacher's output distribution through train.py's loop.

Loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

    loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, hard labels)

with both distributions softened by temperature T, and D one of
- forward_kl: KL(p_teacher || q_student) (Hinton's; mass-covering),
- reverse_kl: KL(q_student || p_teacher) (mode-seeking, as in MiniLLM),
- symmetric_kl: the mean of the two,
- jsd: Jensen-Shannon divergence 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2.
Divergences are summed over the vocabulary (or labels) and averaged over the scored positions: the tokens whose
next-token label is not IGNORE (all tokens of text data, assistant tokens of chat data) or the examples of a
classifier.

Teacher outputs come on the fly (a forward of the teacher in each step) or from a top-k cache: the teacher's k most
likely next tokens, their log-probabilities and the other tokens' mass at the temperature for every position,
computed once into numpy memmaps and reused across epochs and runs (its meta.json names the teacher, k, the
temperature and a hash of the token ids). With a cache the divergence runs over k + 1 buckets: the teacher's k tokens
and one bucket for every other token, whose mass both sides know (kd_loss): exact at any temperature.

Students: a preset (its shape, with the teacher's vocabulary), a config.json, a model folder (e.g. a structurally
pruned teacher from `llmkit prune`: the Minitron recipe), or a copy of the teacher keeping some blocks
(init_from_teacher + keep_layers).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.compress import report as cr
from llmkit.compress.report import non_embedding_params, storage_dtype
from llmkit.data.corpus import IGNORE
from llmkit.data.sft import ExampleLoader, build_examples, collate, detect_task, read_task_data, split_train_val
from llmkit.infer.classify import pad_id_for
from llmkit.model.checkpoint import build_model, load_model, save_model
from llmkit.model.config import PRESETS, ModelConfig, preset
from llmkit.model.transformer import Transformer
from llmkit.train.loop import setup_distributed, train
from llmkit.train.setup import FinetuneConfig
from llmkit.utils.io import write_json

LOSSES = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd")


# ---------------------------------------------------------------------------------------------------------------
# losses


def divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence (..., K) -> (...) between teacher and student log-probabilities over the same support."""
    if kind == "forward_kl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "symmetric_kl":
        return 0.5 * (divergence(s_logp, t_logp, "forward_kl") + divergence(s_logp, t_logp, "reverse_kl"))
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([s_logp, t_logp]), 0) - math.log(2)
        return 0.5 * (t_logp.exp() * (t_logp - m)).sum(-1) + 0.5 * (s_logp.exp() * (s_logp - m)).sum(-1)
    raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, not {kind!r}")


TAIL_FLOOR = -80.0  # log of an empty tail bucket (exp(-80) ~ 2e-35: zero, without 0 * log 0 = nan)
TAIL_MIN = 1e-5  # a teacher tail below this is rounding (1 - a sum of k cached probabilities): taken as empty


def _teacher_with_tail(logp: torch.Tensor, T: float = 1.0, tail: torch.Tensor | None = None) -> torch.Tensor:
    """(..., k) cached log-probabilities at temperature 1 -> (..., k + 1) log-probabilities at temperature T: the k
    tokens and one bucket for all the others.

    tail (...): the log of the others' mass at T (the cache's tail.npy; teacher_top_k computes it from the full
    logits). At T the k tokens keep their shares p_i^(1/T) among themselves and together hold 1 - exp(tail): exact at
    any T. Without tail only T = 1 is possible (the others' mass is then 1 - the k probabilities; at T != 1 it needs
    every tail token's probability, which the top k do not give)."""
    if tail is None:
        if T != 1:
            raise ValueError(f"a top-k teacher at temperature {T:g} needs its tail mass at that temperature "
                             "(teacher_tail; a teacher cache holds it)")
        rest = 1 - logp.exp().sum(-1, keepdim=True)
        rest = torch.where(rest > TAIL_MIN, rest, torch.zeros_like(rest))
        return torch.cat([logp, rest.log().clamp(min=TAIL_FLOOR)], dim=-1)
    tail = tail.float().unsqueeze(-1).clamp(min=TAIL_FLOOR, max=0)
    head = torch.log1p(-tail.exp()).clamp(min=TAIL_FLOOR)  # log of the k tokens' mass at T
    return torch.cat([F.log_softmax(logp / T, dim=-1) + head, tail], dim=-1)


def _student_with_tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(..., V) full log-probabilities -> (..., k + 1) at ids plus the exact log-mass of every other token."""
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([logp.gather(-1, ids), rest.clamp(min=TAIL_FLOOR)], dim=-1)


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float):
    """What the cache keeps of a teacher's logits (..., V): the top-k ids, their log-probabilities at temperature 1
    and the log-mass at `temperature` of every other token (TAIL_FLOOR when k is the vocabulary)."""
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    tail = _student_with_tail(F.log_softmax(teacher_logits.float() / temperature, dim=-1), top.indices)[..., -1]
    return top.indices, top.values, tail


def kd_loss(student_logits, teacher_logits=None, *, temperature: float = 2.0, kind: str = "forward_kl",
            teacher_ids=None, teacher_logprobs=None, teacher_tail=None) -> torch.Tensor:
    """T^2 * mean divergence over rows: student (N, V) against full teacher logits (N, V), or a top-k teacher
    (ids (N, k), log-probabilities (N, k) at temperature 1, and tail (N,) the log-mass of every other token at
    temperature T, as teacher_top_k gives them; tail may be left out at T = 1).

    With a top-k teacher both sides become distributions over k + 1 buckets at temperature T: the teacher's k tokens
    and "any other token", whose mass is known for the teacher (the cached tail) and for the student (exactly, from
    its full softmax). The divergence between those is the bucketed view of the full one, exact at any T: zero, with
    zero gradient, for a student equal to its teacher, and equal to the full one when the k tokens carry all the mass.
    """
    T = temperature
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    if teacher_logits is not None:
        t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    else:
        t = F.log_softmax(_teacher_with_tail(teacher_logprobs.float(), T, teacher_tail), dim=-1)
        s = _student_with_tail(s, teacher_ids.long())
    return divergence(s, t, kind).mean() * T * T


def make_loss(teacher=None, *, temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward_kl",
              classify: bool = False):
    """loss_fn(model, batch) for train.py: alpha * KD + (1 - alpha) * CE, with the KD and CE parts as metrics.

    The teacher's outputs come from the batch ("teacher_ids"/"teacher_logprobs", a top-k cache) or from `teacher`.
    """
    def loss_fn(model, batch):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if classify:
            logits = model(ids, attention_mask=mask, head="classify")  # (B, C)
            with torch.no_grad():
                t_logits = teacher(ids, attention_mask=mask, head="classify")
            ce = F.cross_entropy(logits.float(), batch["labels"])
            kd = kd_loss(logits, t_logits, temperature=temperature, kind=kind)
        else:
            logits = model(ids, attention_mask=mask)  # (B, T, V)
            keep = batch["labels"] != IGNORE
            ce = F.cross_entropy(logits[keep].float(), batch["labels"][keep])
            if alpha == 0:  # plain cross-entropy training (the baseline of a KD run): no teacher forward
                kd = torch.zeros((), device=ce.device)
            elif "teacher_ids" in batch:
                tail = batch["teacher_tail"][keep] if "teacher_tail" in batch else None
                kd = kd_loss(logits[keep], temperature=temperature, kind=kind, teacher_ids=batch["teacher_ids"][keep],
                             teacher_logprobs=batch["teacher_logprobs"][keep], teacher_tail=tail)
            else:
                with torch.no_grad():
                    t_logits = teacher(ids, attention_mask=mask)
                kd = kd_loss(logits[keep], t_logits[keep], temperature=temperature, kind=kind)
        loss = alpha * kd + (1 - alpha) * ce
        return loss, {"kd": kd.detach(), "ce": ce.detach()}

    return loss_fn


# ---------------------------------------------------------------------------------------------------------------
# students


def same_tokenizer(t_tok, s_tok) -> bool:
    """Two tokenizers map every token string to the same id."""
    return t_tok.hf.get_vocab(with_added_tokens=True) == s_tok.hf.get_vocab(with_added_tokens=True)


def keep_layers(teacher, layers: list[int]):
    """A copy of the teacher holding only the given blocks (in the given order)."""
    n = teacher.config.n_layer
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n for i in layers):
        raise ValueError(f"--keep-layers must list distinct block indices in 0..{n - 1}, got {layers}")
    sd = teacher.state_dict()
    out = {k: v.clone() for k, v in sd.items() if not k.startswith("layers.")}
    for j, i in enumerate(layers):
        out.update({f"layers.{j}." + k.removeprefix(f"layers.{i}."): v.clone()
                    for k, v in sd.items() if k.startswith(f"layers.{i}.")})
    return build_model(teacher.config.replace(n_layer=len(layers)), out, dtype=next(teacher.parameters()).dtype)


def build_student(spec: str | None, teacher_lm, init_from_teacher: bool = False, layers: list[int] | None = None,
                  seed: int = 0):
    """(student model, note): from the teacher's blocks, a model folder, a preset or a config.json."""
    tcfg = teacher_lm.model.config
    if init_from_teacher:
        if spec:
            raise ValueError("give either --student or --init-from-teacher, not both")
        return keep_layers(teacher_lm.model, layers or list(range(0, tcfg.n_layer, 2))), "teacher blocks"
    if layers:
        raise ValueError("--keep-layers needs --init-from-teacher")
    if not spec:
        raise ValueError("no student: pass --student PRESET|config.json|FOLDER or --init-from-teacher")
    p = Path(spec)
    if p.is_dir():
        lm = load_model(p, dtype="float32")
        if lm.tokenizer is not None and teacher_lm.tokenizer is not None and \
                not same_tokenizer(teacher_lm.tokenizer, lm.tokenizer):
            raise ValueError(f"teacher and student tokenizers differ ({spec} maps tokens to other ids): "
                             "distillation compares distributions over the same vocabulary")
        model, note = lm.model, "model folder"
    elif spec in PRESETS or p.suffix == ".json":
        torch.manual_seed(seed)
        if spec in PRESETS:  # the preset's shape with the teacher's vocabulary and special tokens
            cfg = preset(spec, vocab_size=tcfg.vocab_size, bos_token_id=tcfg.bos_token_id,
                         eos_token_id=tcfg.eos_token_id, pad_token_id=tcfg.pad_token_id,
                         num_labels=tcfg.num_labels, id2label=tcfg.id2label)
        else:
            if not p.is_file():
                raise FileNotFoundError(f"student config not found: {spec}")
            try:
                cfg = ModelConfig.from_dict(json.loads(p.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{spec} is not valid JSON ({e})") from None
        model, note = Transformer(cfg), "random init"
    else:
        raise ValueError(f"--student {spec!r} is neither a model folder, a preset ({', '.join(PRESETS)}) nor a "
                         ".json config")
    scfg = model.config
    if scfg.vocab_size != tcfg.vocab_size:
        raise ValueError(f"teacher and student tokenizers differ: vocabularies of {tcfg.vocab_size} and "
                         f"{scfg.vocab_size} tokens; the student must use the teacher's tokenizer")
    if bool(scfg.num_labels) != bool(tcfg.num_labels) or scfg.num_labels != tcfg.num_labels:
        raise ValueError(f"teacher has {tcfg.num_labels} labels, student {scfg.num_labels}: a classifier teacher "
                         "needs a classifier student with the same labels")
    return model, note


# ---------------------------------------------------------------------------------------------------------------
# top-k teacher cache (numpy memmaps, one row per token: ids int32 and log-probabilities float16 (n, k), the log-mass
# at the run's temperature of every other token float32 (n,))

CACHE_FORMAT = 2  # 2: tail.npy added (issue 27); a cache without it is rebuilt


def _fingerprint(teacher_lm, k: int, examples: list[dict], temperature: float) -> dict:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e["input_ids"], dtype=np.int64).tobytes())
        h.update(b"|")
    with torch.no_grad():  # which weights, cheaply
        wsum = float(sum(p.double().sum() for p in teacher_lm.model.parameters()))
    return {"format": CACHE_FORMAT, "teacher": str(teacher_lm.path),
            "teacher_config": teacher_lm.model.config.to_dict(), "teacher_weight_sum": round(wsum, 3), "k": k,
            "temperature": float(temperature), "tokens_sha256": h.hexdigest(),
            "n_tokens": sum(len(e["input_ids"]) for e in examples)}


def check_cache(cache_dir, teacher_lm, k: int, examples: list[dict], temperature: float) -> tuple[dict, bool]:
    """(meta, ready): a complete cache must match this teacher, k, temperature and token ids; a mismatch is an error,
    a cache of an older format is rebuilt (ready False)."""
    meta = _fingerprint(teacher_lm, k, examples, temperature)
    p = Path(cache_dir)
    if (p / "meta.json").is_file():
        old = json.loads((p / "meta.json").read_text())
        if old.get("format") != CACHE_FORMAT:
            print(f"--teacher-cache {cache_dir} has an older format (no tail mass at the temperature): rebuilding it",
                  file=sys.stderr)
            return meta, False
        diff = [key for key in meta if old.get(key) != meta[key]]
        if diff:
            raise ValueError(f"--teacher-cache {cache_dir} was built for another teacher, data, --top-k or "
                             f"--temperature ({', '.join(diff)} differ); use a new folder")
        return meta, True
    if p.exists() and (not p.is_dir() or any(x for x in p.iterdir() if not x.name.startswith("."))):
        raise ValueError(f"--teacher-cache {cache_dir} exists but holds no cache (no meta.json); use a new folder")
    return meta, False


@torch.no_grad()
def build_cache(cache_dir, teacher, examples: list[dict], k: int, meta: dict, batch_size: int = 8,
                progress: bool = True):
    """Run the teacher once over every example and store its top-k next-token ids and log-probabilities, and the
    log-mass of the other tokens at meta's temperature (teacher_top_k)."""
    from tqdm import tqdm

    p = Path(cache_dir)
    p.mkdir(parents=True, exist_ok=True)
    n = meta["n_tokens"]
    ids = np.lib.format.open_memmap(p / ".ids.npy.tmp", mode="w+", dtype=np.int32, shape=(n, k))
    lps = np.lib.format.open_memmap(p / ".logprobs.npy.tmp", mode="w+", dtype=np.float16, shape=(n, k))
    tails = np.lib.format.open_memmap(p / ".tail.npy.tmp", mode="w+", dtype=np.float32, shape=(n,))
    offsets = np.cumsum([0] + [len(e["input_ids"]) for e in examples])
    device = next(teacher.parameters()).device
    teacher.eval()
    for s in tqdm(range(0, len(examples), batch_size), desc="teacher top-k cache", disable=not progress,
                  file=sys.stderr):
        chunk = examples[s:s + batch_size]
        # right padding: a causal model's outputs at the real positions do not depend on what follows them
        b = collate([{"input_ids": e["input_ids"], "labels": 0} for e in chunk], 0)
        top_ids, top_lps, tail = teacher_top_k(teacher(b["input_ids"].to(device), attention_mask=b["attention_mask"]
                                               .to(device)), k, meta["temperature"])
        for j, e in enumerate(chunk):
            a, t = offsets[s + j], len(e["input_ids"])
            ids[a:a + t], lps[a:a + t] = top_ids[j, :t].cpu().numpy(), top_lps[j, :t].cpu().numpy()
            tails[a:a + t] = tail[j, :t].clamp(min=TAIL_FLOOR).cpu().numpy()
    for name, arr in (("ids", ids), ("logprobs", lps), ("tail", tails)):
        arr.flush()
        (p / f".{name}.npy.tmp").replace(p / f"{name}.npy")
    write_json(p / "meta.json", meta)  # written last: its presence means the cache is complete


def attach_cache(cache_dir, examples: list[dict]):
    """Give each example views of its rows of the cache ("teacher_ids", "teacher_logprobs", "teacher_tail")."""
    p = Path(cache_dir)
    ids, lps = np.load(p / "ids.npy", mmap_mode="r"), np.load(p / "logprobs.npy", mmap_mode="r")
    tails = np.load(p / "tail.npy", mmap_mode="r")
    a = 0
    for e in examples:
        b = a + len(e["input_ids"])
        e["teacher_ids"], e["teacher_logprobs"], e["teacher_tail"] = ids[a:b], lps[a:b], tails[a:b]
        a = b


def kd_collate(examples: list[dict], pad_id: int) -> dict:
    """data.sft.collate plus the examples' cached teacher rows, zero-padded (padding is never scored)."""
    batch = collate(examples, pad_id)
    if "teacher_ids" in examples[0]:
        B, T = batch["input_ids"].shape
        k = examples[0]["teacher_ids"].shape[1]
        ids, lps = torch.zeros(B, T, k, dtype=torch.long), torch.zeros(B, T, k, dtype=torch.float32)
        tails = torch.full((B, T), TAIL_FLOOR)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.from_numpy(np.asarray(e["teacher_ids"], dtype=np.int64))
            lps[i, :n] = torch.from_numpy(np.asarray(e["teacher_logprobs"], dtype=np.float32))
            if "teacher_tail" in e:
                tails[i, :n] = torch.from_numpy(np.asarray(e["teacher_tail"], dtype=np.float32))
        batch["teacher_ids"], batch["teacher_logprobs"] = ids, lps
        if "teacher_tail" in examples[0]:
            batch["teacher_tail"] = tails
    return batch


# ---------------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class DistillConfig:
    teacher: str
    data: str
    out: str
    student: str | None = None  # preset, config.json or model folder
    init_from_teacher: bool = False
    keep_layers: list[int] | None = None  # with init_from_teacher; None: every other block
    loss: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term; 1 - alpha on the hard-label cross-entropy
    teacher_cache: str | None = None
    top_k: int = 64
    task: str | None = None  # text | chat | instruct | classify; detected from the file when None
    val_data: str | None = None
    val_fraction: float = 0.1
    max_length: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    report: bool = True
    report_kwargs: dict = field(default_factory=dict)


def validate(dc: DistillConfig, resume: bool = False):
    """Flag checks that need no model (run before anything is loaded or written)."""
    if dc.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, not {dc.loss!r}")
    if not dc.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {dc.temperature}")
    if not 0 <= dc.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {dc.alpha}")
    if dc.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {dc.top_k}")
    if dc.batch_size < 1 or dc.max_length < 2:
        raise ValueError("--batch-size must be >= 1 and --max-length >= 2")
    for f in (dc.data, dc.val_data):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"data file not found: {f}")
    out = Path(dc.out)
    if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty: pass --resume to continue that run, or a new --out")


def prepare(dc: DistillConfig) -> dict:
    """Load teacher and student, tokenize the data, check they fit together; nothing is written."""
    teacher_lm = load_model(dc.teacher, dtype="float32", device=dc.device)
    tok, tcfg = teacher_lm.tokenizer, teacher_lm.model.config
    if tok is None:
        raise ValueError(f"{dc.teacher} has no tokenizer; distillation needs one")
    if not tcfg.causal and not tcfg.num_labels:
        raise ValueError("the teacher is an encoder without a classification head: distill causal LMs or "
                         "classifiers")
    student, how = build_student(dc.student, teacher_lm, dc.init_from_teacher, dc.keep_layers, dc.seed)
    classify = bool(tcfg.num_labels)
    fc = FinetuneConfig(data=dc.data, out=dc.out, max_length=min(dc.max_length, tcfg.max_position_embeddings,
                                                                 student.config.max_position_embeddings),
                        seed=dc.seed, task=dc.task)
    data, kind = read_task_data(dc.data)
    task = dc.task or detect_task(data, kind)
    if classify != (task == "classify"):
        raise ValueError(f"a {'classifier' if classify else 'language-model'} teacher needs "
                         f"{'classification' if classify else 'text or chat'} data, got {task} data")
    if task in ("chat", "instruct") and not tok.chat_template:
        raise ValueError(f"{dc.teacher} has no chat template, so {task} data cannot be rendered; use --task text")
    id2label = tcfg.id2label if classify else None
    train_ex, _, _, _, _ = build_examples(tok, data, kind, task, fc, id2label=id2label, path=dc.data)
    if dc.val_data:
        vdata, vkind = read_task_data(dc.val_data)
        val_ex = build_examples(tok, vdata, vkind, task, fc, id2label=id2label, path=dc.val_data)[0]
    else:
        (train_ex,), (val_ex,) = split_train_val(train_ex, dc.val_fraction, dc.seed)
    if len(train_ex) < dc.batch_size:
        raise ValueError(f"{len(train_ex)} training examples are fewer than one batch of {dc.batch_size}: "
                         "use more data or a smaller --batch-size")
    if dc.teacher_cache and classify:
        raise ValueError("--teacher-cache holds next-token distributions of a causal LM; a classifier teacher's "
                         "soft labels are computed on the fly")
    t_size, s_size = non_embedding_params(teacher_lm.model), non_embedding_params(student)
    if s_size > t_size:
        print(f"warning: the student ({s_size:,} non-embedding parameters) is larger than its teacher "
              f"({t_size:,})", file=sys.stderr)
    meta = ready = None
    if dc.teacher_cache:
        meta, ready = check_cache(dc.teacher_cache, teacher_lm, min(dc.top_k, tcfg.vocab_size), train_ex + val_ex,
                                  dc.temperature)
    return dict(teacher=teacher_lm, student=student, how=how, task=task, classify=classify, train=train_ex,
                val=val_ex, tok=tok, cache_meta=meta, cache_ready=ready, sizes=(t_size, s_size))


def distill(dc: DistillConfig, tc, epochs: float | None = None) -> dict:
    """Distill dc.teacher into the student with train.py's loop configured by tc; returns the final metrics."""
    t0 = time.time()
    validate(dc, tc.resume)
    p = prepare(dc)
    teacher, student, tok = p["teacher"].model, p["student"], p["tok"]
    rank, world, _ = setup_distributed(tc.device)  # under torchrun: rank 0 builds the cache and writes the report
    if dc.teacher_cache:
        if not p["cache_ready"]:
            if rank == 0:
                build_cache(dc.teacher_cache, teacher, p["train"] + p["val"], p["cache_meta"]["k"],
                            p["cache_meta"], progress=dc.progress)
            if world > 1:
                torch.distributed.barrier()
        elif rank == 0:
            print(f"reusing the teacher cache in {dc.teacher_cache}", file=sys.stderr)
        attach_cache(dc.teacher_cache, p["train"] + p["val"])
        teacher_for_loss = None
    else:
        teacher.eval().requires_grad_(False)
        teacher_for_loss = teacher
    pad = pad_id_for(tok, student.config)
    train_data = ExampleLoader(p["train"], dc.batch_size, pad, seed=dc.seed, collate_fn=kd_collate, rank=rank,
                               world_size=world)
    val_data = ExampleLoader(p["val"], dc.batch_size, pad, shuffle=False, collate_fn=kd_collate)
    if epochs is not None or tc.max_steps <= 0:
        tc.max_steps = max(1, round((epochs or 1.0) * len(train_data) / max(1, tc.grad_accum)))
    if tc.warmup_steps < 0:
        tc.warmup_steps = max(1, tc.max_steps * 3 // 100)
    tc.eval_steps = max(tc.eval_steps, len(val_data))
    loss_fn = make_loss(teacher_for_loss, temperature=dc.temperature, alpha=dc.alpha, kind=dc.loss,
                        classify=p["classify"])
    t_size, s_size = p["sizes"]
    source = f"top-{p['cache_meta']['k']} cache" if dc.teacher_cache else "teacher on the fly"
    print(f"distilling {dc.teacher} ({t_size:,} non-embedding parameters) into a {p['how']} student "
          f"({s_size:,}): {dc.loss}, T={dc.temperature}, alpha={dc.alpha}, {len(p['train'])} train / "
          f"{len(p['val'])} val examples, {source}",
          file=sys.stderr)
    run = {"distill": {k: v for k, v in dc.__dict__.items() if k != "report_kwargs"} | {
        "task": p["task"], "student_init": p["how"], "teacher_non_embedding_params": t_size,
        "student_non_embedding_params": s_size}}
    dtype = storage_dtype(dc.teacher)  # the student's file in the teacher's storage dtype: sizes compare fairly
    student.train()
    result = train(student, train_data, loss_fn, tc, val_data=val_data,
                   save_fn=lambda d, m: save_model(d, m, tok, p["teacher"].generation_config, dtype=dtype),
                   run_config=run)
    result["run_seconds"] = time.time() - t0
    if dc.report and tc.out and rank == 0:
        rows = [cr.measure(dc.teacher, name="teacher", **dc.report_kwargs),
                cr.measure(dc.out, name=f"student ({dc.loss})", run_seconds=result["run_seconds"],
                           **dc.report_kwargs)]
        notes = [f"student: {p['how']}, {s_size:,} of the teacher's {t_size:,} non-embedding parameters"]
        print(cr.render(rows, notes))
        result["report"] = str(cr.write_report(dc.out, rows, notes))
    return result
