"""Starting training processes: torchrun (one node), torchrun rendezvous (many nodes), Slurm.

Two halves:

* the **parent side** — ``build_torchrun_command`` and ``slurm_script`` produce the command / batch script;
  ``relaunch`` (used by a stage body when ``launcher: torchrun``) writes a *launch context* file, runs
  torchrun on this node and turns rank 0's result file back into a ``StageResult``;
* the **per-rank entry point** — ``python -m llmforge.train.launch CONTEXT.json`` — rebuilds the
  ``StageContext`` from the context file (manifest path + overrides, upstream outputs, out_dir, options),
  runs the stage body (which joins the process group from torchrun's environment) and, on rank 0, writes
  ``result.json``; a rank that fails writes ``error_rank<N>.json`` so the parent can re-raise a clean error.

The launch context exists because the stage runner, not the stage, knows where upstream artifacts are;
passing them explicitly keeps the child processes free of any pipeline logic.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import console
from ..errors import LLMForgeError, StageError, TrainingError
from ..stage import StageContext, StageResult
from ..utils.atomic import write_json

log = console.get_logger(__name__)

RESULT_FILE = "result.json"


def build_torchrun_command(
    context: str | os.PathLike,
    *,
    nproc: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    python: str | None = None,
) -> list[str]:
    """``python -m torch.distributed.run ... -m llmforge.train.launch CONTEXT`` as an argv list.

    One node without an endpoint uses ``--standalone`` (a private rendezvous on a free port, so concurrent
    runs on one machine never collide); otherwise the c10d rendezvous at ``rdzv_endpoint`` (``host:port``
    of any one node, the same on every node).
    """
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        if rdzv_endpoint is None:
            raise TrainingError(
                f"{nnodes} nodes need a rendezvous endpoint: set pretrain.rdzv_endpoint (host:port of the "
                "first node) or use the Slurm script (`llmforge train pretrain --print-slurm`)"
            )
        cmd += [
            "--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
            "--rdzv-id", rdzv_id or "llmforge",
        ]  # fmt: skip
    cmd += ["--nproc-per-node", str(nproc), "-m", "llmforge.train.launch", str(context)]
    return cmd


def write_context(ctx: StageContext, path: Path) -> Path:
    """Serialize what a rank needs to rebuild ``ctx`` (JSON; paths absolute)."""
    write_json(path, _context_dict(ctx.name, ctx.loaded, ctx.out_dir, ctx.upstream, ctx.options))
    return path


def _context_dict(stage: str, loaded, out_dir: Path, upstream: dict, options: dict) -> dict[str, Any]:
    return {
        "stage": stage,
        "manifest": str(Path(loaded.path).absolute()),
        "overrides": list(loaded.overrides),
        "out_dir": str(Path(out_dir).absolute()),
        "upstream": {
            s: {k: str(Path(p).absolute()) for k, p in outs.items()} for s, outs in upstream.items()
        },
        "options": {k: v for k, v in options.items() if isinstance(v, str | int | float | bool | type(None))},
    }


def read_context(path: str | os.PathLike) -> StageContext:
    from ..manifest import load

    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    loaded = load(raw["manifest"], raw["overrides"])
    upstream = {s: {k: Path(p) for k, p in outs.items()} for s, outs in raw["upstream"].items()}
    out_dir = Path(raw["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        name=raw["stage"], loaded=loaded, out_dir=out_dir, upstream=upstream, options=raw["options"]
    )


def relaunch(ctx: StageContext, nproc: int) -> StageResult:
    """Run ``ctx``'s stage under torchrun with ``nproc`` processes on this node; return rank 0's result."""
    launch_dir = ctx.out_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    for stale in [launch_dir / RESULT_FILE, *launch_dir.glob("error_rank*.json")]:
        stale.unlink(missing_ok=True)
    context = write_context(ctx, launch_dir / "context.json")
    section = getattr(ctx.manifest, ctx.name)
    cmd = build_torchrun_command(
        context,
        nproc=nproc,
        nnodes=getattr(section, "nnodes", 1),
        rdzv_endpoint=getattr(section, "rdzv_endpoint", None),
    )
    env = dict(os.environ)
    # the children must import this very llmforge, installed or not
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("launching %d processes: %s", nproc, shlex.join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=str(ctx.project_dir), check=False)
    if proc.returncode != 0:
        raise _child_error(launch_dir, proc.returncode)
    result_file = launch_dir / RESULT_FILE
    if not result_file.is_file():
        raise TrainingError(f"torchrun finished but rank 0 wrote no {result_file}; see the log above")
    raw = json.loads(result_file.read_text(encoding="utf-8"))
    return StageResult(
        outputs={k: Path(v) for k, v in raw["outputs"].items()},
        metrics=raw["metrics"],
        summary=[tuple(r) for r in raw["summary"]],
        tables=raw.get("tables", []),
    )


def _child_error(launch_dir: Path, rc: int) -> LLMForgeError:
    from .. import errors

    for f in sorted(launch_dir.glob("error_rank*.json")):
        try:
            raw = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        cls = getattr(errors, raw.get("type", ""), None)
        msg = raw.get("message", "")
        if isinstance(cls, type) and issubclass(cls, LLMForgeError):
            try:
                return cls(msg)
            except TypeError:  # classes with a richer constructor
                pass
        return TrainingError(f"a training process failed: {raw.get('type')}: {msg}")
    return TrainingError(f"torchrun exited with status {rc}; see the log above for the failing rank")


def slurm_script(
    loaded,
    *,
    upstream: dict[str, dict[str, Path]],
    stage: str = "pretrain",
    out_dir: str | os.PathLike | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    job_name: str | None = None,
    port: int = 29500,
) -> str:
    """An ``sbatch`` script that runs ``stage`` on ``nodes`` x ``gpus_per_node`` GPUs via torchrun rendezvous.

    ``loaded`` is the ``LoadedManifest`` (its overrides are baked in), ``upstream`` the same mapping the stage
    runner gives the stage (``{"tokenizer": {"tokenizer": path, "shards": path}}``). Defaults come from
    ``<stage>.nnodes``, ``<stage>.nproc`` and ``<stage>.slurm``. One ``srun`` task per node starts torchrun,
    which starts one process per GPU; every node meets at the first node of the allocation. Afterwards,
    ``llmforge run <stage>`` finds the final checkpoint (``resume: auto``) and records the stage's lineage.
    """
    section = getattr(loaded.manifest, stage)
    sl = section.slurm
    nodes = nodes or section.nnodes
    gpus = gpus_per_node or sl.gpus_per_node or section.nproc
    out = Path(out_dir) if out_dir is not None else loaded.runs_dir / stage
    out = out.absolute()
    ctx = _context_dict(stage, loaded, out, upstream, {})
    context_path = out / "launch" / "context-${SLURM_JOB_ID}.json"
    name = job_name or f"{loaded.manifest.project.name}-{stage}"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={sl.cpus_per_task}",
        f"#SBATCH --time={sl.time}",
        f"#SBATCH --output={out}/slurm-%j.out",
    ]
    if sl.partition:
        lines.append(f"#SBATCH --partition={sl.partition}")
    if sl.account:
        lines.append(f"#SBATCH --account={sl.account}")
    lines += [f"#SBATCH {x}" for x in sl.extra_sbatch]
    lines += [
        "",
        f"# generated by llmforge for stage `{stage}` of {loaded.path}",
        "set -euo pipefail",
        f"cd {shlex.quote(str(loaded.root.absolute()))}",
        *sl.setup,
        f"export OMP_NUM_THREADS={max(1, sl.cpus_per_task // gpus)}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'mkdir -p "{out}/launch"',
        f"cat > \"{context_path}\" <<'LLMFORGE_CONTEXT'",
        json.dumps(ctx, indent=2),
        "LLMFORGE_CONTEXT",
        "",
        "srun --kill-on-bad-exit=1 python -m torch.distributed.run \\",
        f'  --nnodes "$SLURM_NNODES" --nproc-per-node {gpus} \\',
        f'  --rdzv-backend c10d --rdzv-endpoint "$head_node:{port}" --rdzv-id "$SLURM_JOB_ID" \\',
        f'  -m llmforge.train.launch "{context_path}"',
        "",
    ]
    return "\n".join(lines)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry point (what torchrun starts): ``python -m llmforge.train.launch CONTEXT.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m llmforge.train.launch CONTEXT.json\n")
        return 2
    console.configure("plain", quiet=_rank() != 0)
    from . import dist

    ctx: StageContext | None = None
    try:
        ctx = read_context(argv[0])
        from ..pipeline import Pipeline

        body = Pipeline().get(ctx.name).load()  # the stage registry is the one table of stage bodies
        result: StageResult = body(ctx)
        if _rank() == 0:
            write_json(
                ctx.out_dir / "launch" / RESULT_FILE,
                {
                    "outputs": {k: str(v) for k, v in result.outputs.items()},
                    "metrics": result.metrics,
                    "summary": [list(r) for r in result.summary],
                    "tables": result.tables,
                },
            )
        # every rank reaches here before any rank tears the process group down: a gloo rank that destroys its
        # group while a peer's last collective or socket close is still in flight can abort the peer
        # ("terminate called without an active exception", SIGABRT) after a fully successful run
        dist.barrier()
        return 0
    except LLMForgeError as err:
        _write_error(argv[0], ctx, err)
        console.get_logger(__name__).error("rank %d: %s", _rank(), err)
        return err.exit_code
    except Exception as err:
        _write_error(argv[0], ctx, StageError(f"{type(err).__name__}: {err}"))
        raise
    finally:
        dist.cleanup()


def _write_error(context: str, ctx: StageContext | None, err: Exception) -> None:
    try:
        out = ctx.out_dir if ctx is not None else Path(json.loads(Path(context).read_text())["out_dir"])
        write_json(
            out / "launch" / f"error_rank{_rank()}.json", {"type": type(err).__name__, "message": str(err)}
        )
    except Exception:  # best effort: the rank's own log line still says what failed
        pass


if __name__ == "__main__":
    sys.exit(main())
