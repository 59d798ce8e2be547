"""`llmkit data clean` at every scale: the same output whatever --tasks/--workers (local processes), a local Ray
instance, and the sbatch scripts the Slurm executor would submit (no cluster here: captured, not submitted)."""
import json
import random
import time

import pytest

pytest.importorskip("datatrove")

from llmkit.data.clean import CleanConfig  # noqa: E402
from llmkit.data.pipeline import RunConfig, run_clean  # noqa: E402

WORDS = ("river city music station history war album season species road film court village game ship church "
         "player team league series county island bridge school north south east west").split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Five files; exact and near copies within and across them, some before their source's file ends."""
    rng = random.Random(11)
    folder = tmp_path_factory.mktemp("inputs")
    docs = [" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(60)]
    near = []
    for d in docs[:15]:
        w = d.split()
        w[30] = "zebra"
        near.append(" ".join(w))
    stream = docs + docs[20:30] + near
    rng.shuffle(stream)  # copies may now come before their source: the earliest of each cluster is kept
    files = []
    for i in range(5):
        f = folder / f"part{i}.jsonl"
        f.write_text("".join(json.dumps({"id": f"{i}-{k}", "text": t}) + "\n" for k, t in enumerate(stream[i::5])))
        files.append(f)
    return files


def _clean(files, out, **run):
    rep = run_clean(files, out, CleanConfig(dedup=["exact", "near"]), RunConfig(**run))
    return out.read_bytes(), rep


def test_same_output_whatever_tasks_and_workers(inputs, tmp_path):
    one, rep = _clean(inputs, tmp_path / "a.jsonl", tasks=1, workers=1)
    kept = [json.loads(x) for x in one.decode().splitlines()]
    assert rep["removed"] == {"exact_duplicate": 10, "near_duplicate": 15} and len(kept) == 60
    order = [(int(r["id"].split("-")[0]), int(r["id"].split("-")[1])) for r in kept]
    assert order == sorted(order)  # input order: files as given, records as in each file
    for tasks, workers in ((3, 2), (5, 2)):
        other, rep2 = _clean(inputs, tmp_path / f"b{tasks}.jsonl", tasks=tasks, workers=workers)
        assert other == one and rep2["removed"] == rep["removed"]


def test_folder_output_keeps_one_part_per_task(inputs, tmp_path):
    out = tmp_path / "parts"
    rep = run_clean(inputs, out, CleanConfig(dedup=["exact"]), RunConfig(tasks=2, workers=2))
    assert sorted(p.name for p in out.iterdir()) == ["00000.jsonl", "00001.jsonl"]
    assert sum(len(p.read_text().splitlines()) for p in out.iterdir()) == rep["documents_out"] == 75


def test_slurm_writes_the_sbatch_scripts_it_would_submit(inputs, tmp_path, monkeypatch):
    """No Slurm here: datatrove's sbatch call is replaced, the scripts and the dependency chain are checked."""
    import datatrove.executor.slurm as slurm

    submitted = []

    def fake_sbatch(contents, job_id_retriever, *args):
        submitted.append((contents, args))
        return str(100 + len(submitted))

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_sbatch)
    work, out = tmp_path / "work", tmp_path / "out"
    run = RunConfig(executor="slurm", tasks=4, partition="cpu", work_dir=str(work), time="01:00:00")
    rep = run_clean(inputs, out, CleanConfig(dedup=["exact", "near"], pii="redact"), run)
    jobs = [(c, a) for c, a in submitted if "launch_pickled_pipeline" in c]  # the rest merge each stage's stats
    names = [c.split("--job-name=")[1].split("\n")[0] for c, _ in jobs]
    assert names == ["llmkit-filter", "llmkit-exact-signatures", "llmkit-exact-find", "llmkit-minhash-signatures",
                     "llmkit-minhash-buckets", "llmkit-minhash-cluster", "llmkit-output"]
    first, _ = jobs[0]
    assert "#SBATCH --partition=cpu" in first and "#SBATCH --array=0-3" in first and "#SBATCH --time=01:00:00" in first
    assert "source " in first and "bin/activate" in first  # this environment, on the compute nodes
    assert "#SBATCH --array=0-0" in jobs[2][0]  # the finders run as one task
    ids = [str(100 + submitted.index(j) + 1) for j in jobs]
    for k in range(1, len(jobs)):  # each stage waits for the one before it
        assert f"--dependency=afterok:{ids[k - 1]}" in jobs[k][1]
    assert rep["submitted"] == ids[-1] and (work / "logs" / "filter" / "executor.pik").exists()
    assert not out.exists()  # nothing ran


def test_ray_executor_on_a_local_instance(inputs, tmp_path):
    """Exact dedup only (4 stages): each Ray task costs ~1 s to schedule on 2 cores, and MinHash's bucket stage is
    one task per bucket (51 at 256 permutations): the whole pipeline took 140 s here, too long for the suite."""
    ray = pytest.importorskip("ray")
    cfg = CleanConfig(dedup=["exact"], pii="redact")
    one = run_clean(inputs, tmp_path / "local.jsonl", cfg, RunConfig(tasks=2, workers=2))
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        rep = run_clean(inputs, tmp_path / "ray.jsonl", cfg, RunConfig(executor="ray", tasks=2,
                                                                        work_dir=str(tmp_path / "w")))
        print(f"ray.init {started:.1f} s, pipeline on ray {time.perf_counter() - t1:.1f} s")
    finally:
        ray.shutdown()
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert rep["removed"] == one["removed"] == {"exact_duplicate": 10}
