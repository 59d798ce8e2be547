"""`llmkit data clean` as a datatrove pipeline: one command line on one machine (processes), on Slurm or on Ray.

Stages (each a datatrove executor; the later ones depend on the earlier):

1. filter (N tasks): read -> normalise -> min chars -> language -> Gopher -> C4 -> work/filtered/
2. exact dedup (datatrove's ExactDedupSignature, N tasks; ExactFindDedups, 1 task)
3. near dedup (datatrove's MinhashDedupSignature, N tasks; MinhashDedupBuckets, one task per bucket; llmkit's
   VerifiedCluster, 1 task)
4. output (N tasks): exact and MinHash filters -> PII -> parts/ (one JSONL per task), merged in task order into
   --out (written atomically), or left as parts when --out is a folder or object-store path.

Tasks take contiguous runs of the input files and each duplicate cluster keeps its earliest document, so the output
is the same whatever --tasks and --workers. datatrove is an optional dependency, imported here inside functions.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkit.data.clean import CleanConfig
from llmkit.utils.io import write_results

EXECUTORS = ("local", "slurm", "ray")


@dataclass
class RunConfig:
    """Where the pipeline runs (flags --executor, --tasks, --workers, --work-dir, --partition, ...)."""
    executor: str = "local"
    tasks: int = 1
    workers: int = -1  # -1: local: this machine's CPUs; slurm/ray: no limit
    work_dir: str | None = None  # intermediate files (a shared folder or object store for slurm/ray)
    partition: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    env_command: str | None = None  # slurm: shell line that activates the environment (default: this venv)
    sbatch_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor}")
        if self.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {self.tasks}")
        if self.workers == 0 or self.workers < -1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.executor == "slurm" and not self.partition:
            raise ValueError("--executor slurm needs --partition")
        if self.executor != "local" and not self.work_dir:
            raise ValueError(f"--executor {self.executor} needs --work-dir: a folder every node can reach (shared "
                             "disk or an fsspec URL such as s3://bucket/work)")


def _remote(path: str) -> bool:
    return "://" in str(path)


def bucket_plan(threshold: float, num_perm: int) -> tuple[int, int, float]:
    """(buckets, hashes per bucket, cut): a pair is a duplicate when its signatures agree on >= cut of their hashes
    (MinHash's Jaccard estimate; cut is three standard errors below the threshold, so a pair at the threshold is
    caught 99.9 % of the time), and the buckets are the most selective ones that still make a pair at cut - 0.05 a
    candidate 99 % of the time."""
    cut = threshold - 3 * math.sqrt(threshold * (1 - threshold) / num_perm)
    low = max(0.05, cut - 0.05)
    for r in range(min(16, num_perm), 0, -1):
        b = num_perm // r
        if 1 - (1 - low ** r) ** b >= 0.99:
            return b, r, cut
    return num_perm, 1, cut


def build_stages(files, work: str, parts: str, cfg: CleanConfig, tasks: int, text_field: str = "text",
                 unit: str = "line", records: bool = False) -> list[tuple[str, list, int]]:
    """The pipeline as (stage name, datatrove steps, tasks) in run order."""
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    import llmkit.data.steps as st  # imports datatrove (optional) at its top

    # datatrove's default xxhash path passes str to xxhash, which xxhash >= 4 refuses; sha1 takes str
    SHA1 = HashConfig(precision=64, hash_fc="sha1")

    filtered = f"{work}/filtered"
    steps = [st.Inputs(files, text_field, unit, records)]
    steps += [st.Normalize()] if cfg.normalize else []
    steps += [st.MinChars(cfg.min_chars)] if cfg.min_chars else []
    steps += [st.Language(cfg.langs, cfg.lang_threshold)] if cfg.langs else []
    if cfg.quality in ("gopher", "both"):
        steps += [st.Gopher(), st.DigitRatio(), st.GopherRepetition()]
    steps += [st.C4()] if cfg.quality in ("c4", "both") else []
    stages = [("filter", steps + [JsonlWriter(filtered, "${rank}.jsonl", compression=None)], tasks)]

    def read():
        return st.Intermediate(filtered)

    dedup_steps = []
    if "exact" in cfg.dedup:
        exact = ExactDedupConfig(content_getter=st.exact_text, document_priority=st.earliest_first, hash_config=SHA1)
        stages += [("exact-signatures", [read(), st.TagRank(), ExactDedupSignature(f"{work}/exact-sigs", exact)],
                    tasks),
                   ("exact-find", [ExactFindDedups(f"{work}/exact-sigs", f"{work}/exact-dups", exact)], 1)]
        dedup_steps.append(ExactDedupFilter(f"{work}/exact-dups", exact))
    if "near" in cfg.dedup:
        b, r, cut = bucket_plan(cfg.near_threshold, cfg.num_perm)
        mh = MinhashConfig(n_grams=cfg.shingle, num_buckets=b, hashes_per_bucket=r, seed=cfg.seed,
                           hash_config=SHA1)
        stages += [("minhash-signatures", [read(), *dedup_steps,
                                           MinhashDedupSignature(f"{work}/mh-sigs", mh, language=st.Words())], tasks),
                   ("minhash-buckets", [MinhashDedupBuckets(f"{work}/mh-sigs", f"{work}/mh-buckets", config=mh)], b),
                   ("minhash-cluster", [st.VerifiedCluster(f"{work}/mh-sigs", f"{work}/mh-buckets",
                                                           f"{work}/mh-remove", mh, cut)], 1)]
        dedup_steps.append(MinhashDedupFilter(f"{work}/mh-remove"))
    last = [read(), *dedup_steps] + ([st.Redact(cfg.pii)] if cfg.pii else [])
    stages.append(("output", last + [st.Tally(), st.Output(parts, text_field)], tasks))
    return stages


def make_executor(stages, run: RunConfig, work: str):
    """datatrove executors for the stages, chained by depends=; running the last one runs them all."""
    prev = None
    for name, steps, n in stages:
        common = dict(pipeline=steps, tasks=n, workers=min(run.workers if run.workers > 0 else os.cpu_count() or 1, n),
                      logging_dir=f"{work}/logs/{name}", depends=prev)
        if run.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            prev = LocalPipelineExecutor(**common, start_method="fork" if sys.platform == "linux" else "spawn")
        elif run.executor == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            common["workers"] = n if run.workers < 1 else common["workers"]
            prev = RayPipelineExecutor(**common, cpus_per_task=run.cpus_per_task, mem_per_cpu_gb=run.mem_per_cpu_gb)
        else:
            from datatrove.executor.slurm import SlurmPipelineExecutor

            env = run.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}"
            common["workers"] = -1 if run.workers < 1 else common["workers"]  # no limit: the queue decides
            prev = SlurmPipelineExecutor(**common, time=run.time, partition=run.partition, job_name=f"llmkit-{name}",
                                         cpus_per_task=run.cpus_per_task, mem_per_cpu_gb=run.mem_per_cpu_gb,
                                         env_command=env, sbatch_args=run.sbatch_args)
    return prev


def check_inputs(inputs, out) -> list[str]:
    """Input paths as the readers take them (absolute when local), after the checks that fail before any work."""
    files = []
    for p in inputs:
        p = str(p)
        suffix = Path(p).suffix.lower()
        if suffix not in (".txt", ".jsonl", ".csv", ".tsv", ".parquet"):
            raise ValueError(f"{p}: read .txt, .jsonl, .csv, .tsv or .parquet files")
        if not _remote(p):
            if not Path(p).is_file():
                raise FileNotFoundError(f"data file not found: {p}")
            if Path(p).stat().st_size == 0:
                raise ValueError(f"{p} is empty")
            if not _remote(out) and Path(p).resolve() == Path(out).resolve():
                raise ValueError(f"--out {out} is also an input")
            p = str(Path(p).resolve())
        files.append(p)
    return files


def _stats(work: str) -> Counter:
    """Every counter of every step of every stage, by (stage, step name, key) (datatrove's stats.json per stage)."""
    from datatrove.io import get_datafolder

    folder, total = get_datafolder(f"{work}/logs"), Counter()
    for name in folder.list_files(glob_pattern="*/stats.json"):
        with folder.open(name) as f:
            for step in json.load(f):
                for key, v in step.get("stats", {}).items():
                    total[(name.split("/")[0], step["name"], key)] += v["total"] if isinstance(v, dict) else v
    return total


def report_from_stats(stats: Counter, cfg: CleanConfig) -> dict:
    """The report: documents and bytes in and out, removals per rule, modifications, PII per type, languages."""
    removed, modified, pii, langs, sizes = Counter(), Counter(), Counter(), Counter(), Counter()
    for (stage, step, key), v in stats.items():
        if stage == "output" and key == "dropped" and ("exact" in step or "MinHash" in step):
            removed["exact_duplicate" if "exact" in step else "near_duplicate"] += v
        elif "llmkit" in step and key in ("documents_in", "bytes_in", "documents_out", "bytes_out"):
            sizes[key] += v
        elif key.startswith("dropped_"):
            removed[key[8:]] += v
        elif key.startswith(("modified_", "pii_", "language_")):
            kind, name = key.split("_", 1)
            {"modified": modified, "pii": pii, "language": langs}[kind][name] += v
    return {"documents_in": sizes["documents_in"], "documents_out": sizes["documents_out"],
            "bytes_in": sizes["bytes_in"], "bytes_out": sizes["bytes_out"], "removed": dict(removed.most_common()),
            "modified": dict(modified), "pii": dict(pii), "languages_removed": dict(langs.most_common(20)),
            "config": asdict(cfg)}


@contextlib.contextmanager
def quiet(log: Path, on: bool = True):
    """datatrove's task logs go to log instead of the terminal (file descriptor 2, so worker processes too)."""
    if not on:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def merge_parts(parts: Path, out: Path, text_field: str, unit: str) -> None:
    """The parts (one JSONL per task, named by rank) into one file in task order, written atomically."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    jsonl = out.suffix.lower() == ".jsonl"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for part in sorted(parts.glob("*.jsonl")):
                with open(part, encoding="utf-8") as src:
                    if jsonl:
                        shutil.copyfileobj(src, f)
                        continue
                    for line in src:
                        text = json.loads(line)[text_field]
                        f.write(text.replace("\n", " ") + "\n" if unit == "line" else text + "\n\n")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_clean(inputs, out, cfg: CleanConfig, run: RunConfig | None = None, text_field: str = "text",
              unit: str = "line", report_path=None, quiet_logs: bool = True, records: bool = False) -> dict:
    """Clean inputs into out (.jsonl or .txt file, written atomically; or a folder/URL of JSONL parts) with the
    datatrove pipeline on run's executor; returns the report (for slurm: what was submitted)."""
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise ValueError("llmkit data clean runs on datatrove: pip install 'llmkit[data]'") from None
    run = run or RunConfig()
    if cfg.langs:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        unknown = [x for x in cfg.langs if x not in LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes]
        if unknown:
            raise ValueError(f"--lang {','.join(unknown)}: not a language py3langid knows (ISO 639-1 codes)")
    single = not _remote(out) and Path(out).suffix.lower() in (".jsonl", ".txt")
    if run.executor == "slurm" and single:
        raise ValueError("--executor slurm returns at once: give --out a folder or URL for the JSONL parts")
    if not single and Path(str(out)).suffix:
        raise ValueError(f"--out {out}: write a .txt or .jsonl file, or a folder/URL for JSONL parts")
    files = check_inputs(inputs, out)
    own_work = run.work_dir is None
    work = run.work_dir or str(Path(out).resolve().parent / f".{Path(out).name}.work{os.getpid()}")
    if own_work and Path(work).exists():
        shutil.rmtree(work)
    parts = f"{work}/parts" if single else str(out)
    t0 = time.perf_counter()
    try:
        last = make_executor(build_stages(files, work, parts, cfg, run.tasks, text_field, unit, records), run, work)
        if run.executor == "slurm":
            last.launch_job()
            return {"submitted": last.job_id, "work_dir": work, "output": str(out)}
        if run.executor == "ray":
            import ray

            if not ray.is_initialized():  # the cluster in RAY_ADDRESS (e.g. auto), else a local instance
                ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        with quiet(Path(work) / "logs" / "run.log", on=quiet_logs and not _remote(work)):
            last.run()
        if single:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            merge_parts(Path(parts), Path(out), text_field, unit)
        report = report_from_stats(_stats(work), cfg)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    if report["documents_in"] == 0:
        if single:
            Path(out).unlink(missing_ok=True)
        raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
    seconds = time.perf_counter() - t0
    report = {"inputs": [str(p) for p in inputs], "output": str(out), **report,
              "executor": {k: v for k, v in asdict(run).items() if v not in (None, {}, "")},
              "seconds": round(seconds, 3), "mb_per_s": round(report["bytes_in"] / 1e6 / max(seconds, 1e-9), 3)}
    if report_path:
        write_results(report_path, report)
    return report


def clean_for_training(files, out_dir, cfg: CleanConfig, run: RunConfig | None = None, text_field: str = "text",
                       unit: str = "doc", records: bool = False) -> str:
    """pretrain/finetune --clean: the inputs through the same pipeline into one file in OUT/clean/ (duplicates found
    across all of them) with its report; returns its path. .txt inputs give a .txt (unit "doc": blank-line separated
    documents, "line": one a line), others JSONL; records: fine-tuning records cleaned field by field."""
    files = [Path(f) for f in files]
    stem = files[0].stem if len(files) == 1 else "data"
    folder = Path(out_dir) / "clean"
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (stem + (".txt" if all(f.suffix.lower() == ".txt" for f in files) else ".jsonl"))
    rep = run_clean(files, dst, cfg, run, text_field=text_field, unit=unit, report_path=folder / f"{stem}.report.json",
                    records=records)
    print(f"[clean] kept {rep['documents_out']} of {rep['documents_in']} documents -> {dst}", file=sys.stderr)
    if rep["documents_out"] == 0:
        raise ValueError(f"cleaning removed every document of {', '.join(map(str, files))}: {rep['removed']}")
    return str(dst)
