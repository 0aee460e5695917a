"""Executors built from the manifest: Slurm job scripts (sbatch mocked), Ray (a real local Ray when installed),
and the work-folder rules that make resume safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from llmforge.data import process
from llmforge.data.readers import InputFile
from llmforge.manifest.data import DataSection

PROSE = (
    "The river rises quickly after rain in the hills, even when the town stays dry. Walkers follow the bank "
    "to the old mill, where the water turns the wheel slowly and the heron waits by the weir. "
)


def _articles() -> dict[str, str]:
    import gzip

    corpus = Path(__file__).resolve().parents[2] / "llmforge" / "templates" / "tiny" / "corpus"
    with gzip.open(corpus / "articles.jsonl.gz", "rt", encoding="utf-8") as f:
        return {r["id"]: r["text"] for r in map(json.loads, f) if r["id"].startswith("article-1")}


def _files(tmp_path: Path, n: int = 2) -> list[InputFile]:
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.jsonl"
        p.write_text(json.dumps({"id": f"d{i}", "text": PROSE * 8}) + "\n", encoding="utf-8")
        out.append(InputFile(str(p), "jsonl", "data.inputs[0]"))
    return out


def test_manifest_validation() -> None:
    with pytest.raises(ValueError, match=r"slurm\.partition"):
        DataSection(executor="slurm")
    with pytest.raises(ValueError, match=r"language\.languages"):
        DataSection.model_validate({"language": {"languages": []}})
    assert DataSection(tasks=2, workers=8).workers == 2


def test_plan_shapes(tmp_path: Path) -> None:
    files = _files(tmp_path)
    names = lambda cfg: [p.name for p in process.build_plan(cfg, files, tmp_path / "w").passes]  # noqa: E731
    assert names(DataSection()) == [
        "clean",
        "exact_find",
        "exact_filter",
        "minhash_buckets",
        "minhash_cluster",
        "minhash_filter",
    ]
    assert names(DataSection.model_validate({"dedup": {"exact": False}})) == [
        "clean",
        "minhash_buckets",
        "minhash_cluster",
        "minhash_filter",
    ]
    assert names(DataSection.model_validate({"dedup": {"minhash": {"enabled": False}}})) == [
        "clean",
        "exact_find",
        "exact_filter",
    ]
    assert names(DataSection.model_validate({"dedup": {"exact": False, "minhash": {"enabled": False}}})) == [
        "clean"
    ]
    plan = process.build_plan(DataSection.model_validate({"tasks": 3, "workers": 2}), files, tmp_path / "w")
    buckets = plan.passes[3]
    assert (buckets.tasks, buckets.workers) == (14, 2)  # datatrove's stage 2 needs one task per band
    assert [p.tasks for p in plan.passes] == [3, 1, 3, 14, 1, 3]


def test_config_hash_and_work_dirs(tmp_path: Path) -> None:
    files = _files(tmp_path)
    base = DataSection()
    h = process.config_hash(base, files)
    assert h == process.config_hash(DataSection(workers=1, start_method="spawn"), files)  # runtime-only knobs
    assert h != process.config_hash(DataSection.model_validate({"dedup": {"exact": False}}), files)
    assert h != process.config_hash(base, files[:1])
    Path(files[0].path).write_text("changed\n")
    assert h != process.config_hash(base, files)

    root = tmp_path / "work"
    work, resuming = process.prepare_work_dir(root, "aaaa", {})
    assert not resuming
    (work / "logs" / "clean" / "completions").mkdir(parents=True)
    (work / "logs" / "clean" / "completions" / "00000").touch()
    assert process.prepare_work_dir(root, "aaaa", {}) == (work, True)  # same config: resume
    other, resuming = process.prepare_work_dir(root, "bbbb", {})
    assert not resuming and not work.exists()  # another config: the stale folder is gone
    (other / "DONE").touch()
    (other / "logs").mkdir()
    assert process.prepare_work_dir(root, "bbbb", {})[1] is False and not (other / "logs").exists()


def test_slurm_job_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datatrove.executor.slurm as dt_slurm

    launched: list[tuple[str, tuple]] = []

    def fake_launch(script: str, retriever, *args) -> str:
        launched.append((script, args))
        return str(1000 + len(launched))

    monkeypatch.setattr(dt_slurm, "launch_slurm_job", fake_launch)
    cfg = DataSection.model_validate(
        {
            "executor": "slurm",
            "tasks": 4,
            "slurm": {
                "partition": "cpu",
                "time": "02:00:00",
                "cpus_per_task": 2,
                "mem_per_cpu_gb": 3.0,
                "env_command": "source /shared/venv/bin/activate",
                "qos": "low",
            },
        }
    )
    plan = process.build_plan(cfg, _files(tmp_path), tmp_path / "w")
    process.run_plan(cfg, plan, wait=False)
    jobs = [(s, a) for s, a in launched if "launch_pickled_pipeline" in s]  # each pass also merges its stats
    assert len(jobs) == 6
    for (script, _args), p in zip(jobs, plan.passes, strict=True):
        assert "#SBATCH --partition=cpu" in script and "#SBATCH --time=02:00:00" in script
        assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --mem-per-cpu=3G" in script
        assert "#SBATCH --qos=low" in script and f"#SBATCH --job-name=llmforge-data-{p.name}" in script
        assert f"#SBATCH --array=0-{p.tasks - 1}" in script
        assert "source /shared/venv/bin/activate" in script
        assert f"launch_pickled_pipeline {plan.logging_dir(p.name)}/executor.pik" in script
        assert (plan.logging_dir(p.name) / "executor.pik").exists()
    # each pass waits for the previous one to succeed
    job_ids = [str(1001 + launched.index(j)) for j in jobs]
    assert not any(a.startswith("--dependency") for a in jobs[0][1])
    for prev_id, (_, args) in zip(job_ids, jobs[1:], strict=False):
        assert f"--dependency=afterok:{prev_id}" in args


def test_ray_executor_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from datatrove.executor.ray import RayPipelineExecutor

    cfg = DataSection.model_validate(
        {"executor": "ray", "tasks": 3, "workers": 2, "ray": {"cpus_per_task": 2, "mem_per_cpu_gb": 1.5}}
    )
    plan = process.build_plan(cfg, _files(tmp_path), tmp_path / "w")
    ex = process.build_executor(cfg, plan, plan.passes[0])
    assert isinstance(ex, RayPipelineExecutor)
    assert (ex.tasks, ex.workers, ex.cpus_per_task, ex.mem_per_cpu_gb) == (3, 2, 2, 1.5)
    assert ex.logging_dir.path.endswith("logs/clean") and ex.pipeline is plan.passes[0].pipeline


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_local_instance_end_to_end(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from llmforge.data.report import count_output

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = DataSection.model_validate(
            {
                "executor": "ray",
                "tasks": 2,
                "workers": 2,
                "extract": {"enabled": False},
                "dedup": {"minhash": {"num_buckets": 2, "hashes_per_bucket": 4}},
            }
        )
        texts = list(_articles().values())
        files = []
        for i, text in enumerate([texts[0], texts[1], texts[0]]):  # the third file repeats the first
            p = tmp_path / f"{i}.jsonl"
            p.write_text(json.dumps({"id": f"d{i}", "text": text}) + "\n", encoding="utf-8")
            files.append(InputFile(str(p), "jsonl", "data.inputs[0]"))
        plan = process.build_plan(cfg, files, tmp_path / "w")
        process.run_plan(cfg, plan)
        assert all(process.pass_complete(plan, p) for p in plan.passes)
        assert count_output(plan.output_dir)[0] == 2
    finally:
        ray.shutdown()
