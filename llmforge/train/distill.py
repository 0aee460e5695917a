"""Knowledge distillation: the KD loss, the student, teacher top-k on disk, and the `distill` stage.

**White-box (logit) KD** (``distill.mode: logits``). On the positions SFT trains on (assistant targets of
conversations rendered with the project's chat template; every target with ``train_on_prompt``):

    L = α · (1/N) Σ_t T² · D(p_T(·|x_{≤t}) , q_T(·|x_{≤t}))  +  (1 − α) · (1/N) Σ_t −log q_1(x_{t+1}|x_{≤t})

with p the teacher, q the student, ``p_T = softmax(z_teacher / T)`` and ``q_T = softmax(z_student / T)``, N
the number of labelled positions. D is the forward KL(p ‖ q) (Hinton et al. 2015; mean-seeking, the
default), the reverse KL(q ‖ p) (MiniLLM, Gu et al. 2024; mode-seeking) or the generalised JSD_β of GKD
(Agarwal et al. 2024, eq. 1; m = β p + (1 − β) q). The T² keeps the KD gradient's scale independent of T.
The model's fused kernels (``model/fused.py``) compute both sums chunk by chunk from the student's and the
teacher's final hidden states, never holding [B, T, V] logits; ``distill_loss`` only normalises and mixes.

The teacher's distribution comes either *on the fly* (``distill.topk: 0``: the teacher is a frozen model of
the objective, run under ``no_grad`` beside the student on every micro-batch), or from its **top-k
log-probs saved to disk** (``distill.topk: k``), computed once before training so the teacher need not sit
beside the student. Top-k layout: SFT data is a flat token stream (``sft_data``'s shards), and a
conversation's teacher distributions do not depend on which row it is packed into (positions restart and
attention never crosses conversations), so the store holds one ``[k]`` row of ids and log-probs (at T = 1)
per *stream position* ``s`` — the teacher's prediction after reading tokens ``start..s`` of its
conversation — in ``runs/distill/topk/<split>.{ids,logprobs}.npy``. ``TopkBatches`` knows which stream
positions each packed row holds and gathers them. Both distributions are renormalised over the top-k set
(``fused.kd_divergence_topk``): exact for k = vocabulary, an approximation that ignores the student's mass
outside the set for smaller k (the CE term, α < 1, pushes that down). The store is keyed by the data's
fingerprint, the teacher's files and k, and reused while they are unchanged.

**Black-box KD** (``distill.mode: generations``): the teacher *answers* the prompt set (the conversations of
``distill.generations.prompts``, or of the data, each cut before its last assistant turn) — with llmforge's
own generation from the teacher checkpoint or through any OpenAI-compatible endpoint — the answers are saved
as an SFT dataset with lineage (``runs/distill/generations.jsonl`` + ``generations.lineage.json``,
``generations.py``), and the student is fine-tuned on it with the SFT loss. With an endpoint, the local
``distill.teacher`` (or upstream model) is still what the student is shaped from (and, for
``teacher_layers``, initialised from); it is not the model that answered, so no held-out KL is reported.

**The student** (``distill.student``):

* ``init: teacher_layers`` (default) — a depth-pruned copy of the teacher: its embeddings, final norm, output
  head and the decoder layers listed in ``layers`` (teacher layer indices, ascending, no duplicates;
  default every other layer with the first and the last included: 0, 2, 4, …, L−1). Same width, vocabulary
  and tokenizer; fewer blocks. Starts close to the teacher, so KD needs fewer steps (the DistilBERT /
  "shrink and fine-tune" recipe).
* ``init: scratch`` — random weights of a smaller shape: the teacher's config with the fields given
  (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``num_key_value_heads``) overridden; ``num_hidden_layers`` defaults to half the teacher's (rounded up), the
  MLP keeps the teacher's intermediate/hidden ratio and the head width follows a new ``hidden_size``, and the
  query/KV head ratio is kept when it still divides. Vocabulary, context, RoPE and norms stay the teacher's.

The teacher must use the project's tokenizer (``recipe.check_same_tokenizer``: another tokenizer is an error
naming both) and a vocabulary at least the tokenizer's; the student always has the teacher's vocabulary.

The stage writes ``runs/distill/model`` (the student, an HF directory with the tokenizer) and reports the
student's held-out KL to the teacher (``val_kl``: mean per-token forward KL at T = 1 on the validation
batches), the teacher's and the student's validation CE, and their sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import console
from ..errors import ModelError, StageInputError, UserInputError
from ..stage import StageContext, StageResult
from .loop import LossOutput
from .sft_data import SFTBatches

log = console.get_logger(__name__)

TOPK_FORMAT = "llmforge.distill-topk.v1"
_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


# ------------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------------


def _llama(model: nn.Module):
    from ..model.llama import Llama

    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if not isinstance(inner, Llama):
        raise UserInputError(
            f"logit distillation needs llmforge's Llama model (got {type(inner).__name__}); load the student "
            "with llmforge.model.load_pretrained"
        )
    return inner


def teacher_target(
    teacher: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    ce_grad: bool = True,
):
    """The teacher side of the student's forward: saved top-k when the batch carries it, else the teacher's
    final hidden states for this batch (computed under ``no_grad``) and its head."""
    from ..model.fused import DistillTarget

    if "topk_ids" in batch:
        return DistillTarget(
            kind=kind,
            temperature=temperature,
            jsd_beta=jsd_beta,
            topk_ids=batch["topk_ids"],
            topk_logprobs=batch["topk_logprobs"],
            ce_grad=ce_grad,
        )
    if teacher is None:
        raise UserInputError("distillation needs a teacher model or batches carrying the teacher's top-k")
    t = _llama(teacher)
    with torch.no_grad():
        hidden = t.hidden_states(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            document_ids=batch.get("document_ids"),
        )
    return DistillTarget(
        kind=kind,
        temperature=temperature,
        jsd_beta=jsd_beta,
        teacher_hidden=hidden,
        teacher_weight=t.lm_head.weight,
        ce_grad=ce_grad,
    )


def distill_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    teacher: nn.Module | None = None,
    *,
    alpha: float = 0.5,
    kind: str = "forward_kl",
    temperature: float = 2.0,
    jsd_beta: float = 0.5,
) -> LossOutput:
    """α · Σ T²·D(teacher, student) / N + (1 − α) · Σ CE / N over the N labelled positions (module docstring).

    ``batch`` is an SFT batch (``input_ids``, ``labels``, ``position_ids``, ``document_ids``), optionally
    with ``topk_ids``/``topk_logprobs`` [B, T, k] from a ``TopkStore`` (then ``teacher`` is not used).
    Weight = N; tokens = the non-padding tokens; metrics ``kd`` (Σ T²·D / N) and ``ce`` (Σ CE / N).
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserInputError(f"distill.alpha must lie in [0, 1], got {alpha}")
    labels = batch["labels"]
    doc = batch.get("document_ids")
    tokens = (doc >= 0).sum() if doc is not None else batch["input_ids"].numel()
    target = teacher_target(
        teacher, batch, kind=kind, temperature=temperature, jsd_beta=jsd_beta, ce_grad=alpha < 1.0
    )
    out = model(
        batch["input_ids"],
        labels=labels,
        position_ids=batch.get("position_ids"),
        document_ids=doc,
        distill=target,
    )
    n = out.num_tokens.clamp(min=1)
    kd, ce = out.kd_sum / n, out.ce_sum / n
    if alpha == 1.0:
        loss = kd
    elif alpha == 0.0:
        loss = ce
    else:
        loss = alpha * kd + (1.0 - alpha) * ce
    return LossOutput(
        loss=loss, weight=out.num_tokens, tokens=tokens, metrics={"kd": kd.detach(), "ce": ce.detach()}
    )


@dataclass
class DistillLoss:
    """``distill_loss`` with its settings bound: the ``Objective``'s loss function. The teacher it holds is
    the objective's frozen model (the core places it; this only reads it)."""

    teacher: nn.Module | None
    alpha: float = 0.5
    kind: str = "forward_kl"
    temperature: float = 2.0
    jsd_beta: float = 0.5

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        return distill_loss(
            model,
            batch,
            self.teacher,
            alpha=self.alpha,
            kind=self.kind,
            temperature=self.temperature,
            jsd_beta=self.jsd_beta,
        )


@torch.no_grad()
def heldout_kl(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    autocast=None,
) -> dict[str, float] | None:
    """Per-token means over the labelled positions of ``batches``: ``kl`` = KL(teacher ‖ student) at T = 1,
    ``student_ce`` and ``teacher_ce`` (summed across ranks when a process group is up). None if empty."""
    import contextlib

    from . import dist
    from .loop import _to_device

    s, t = _llama(student), _llama(teacher)
    was = s.training, t.training
    s.eval()
    t.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    ctx = autocast or contextlib.nullcontext
    for batch in batches:
        batch = _to_device(
            {k: v for k, v in batch.items() if not k.startswith("topk_")}, torch.device(device)
        )
        with ctx():
            target = teacher_target(t, batch, kind="forward_kl", temperature=1.0, ce_grad=False)
            out = s(
                batch["input_ids"],
                labels=batch["labels"],
                position_ids=batch.get("position_ids"),
                document_ids=batch.get("document_ids"),
                distill=target,
            )
            tce = t(
                batch["input_ids"],
                labels=batch["labels"],
                position_ids=batch.get("position_ids"),
                document_ids=batch.get("document_ids"),
                output="ce_sum",
            )
        sums += torch.stack([out.kd_sum, out.ce_sum, tce.loss_sum, out.num_tokens.float()]).double()
    sums = dist.all_reduce_sum(sums)
    s.train(was[0])
    t.train(was[1])
    n = float(sums[3])
    if n <= 0:
        return None
    return {"kl": float(sums[0]) / n, "student_ce": float(sums[1]) / n, "teacher_ce": float(sums[2]) / n}


# ------------------------------------------------------------------------------------------------------
# the student
# ------------------------------------------------------------------------------------------------------


def default_layers(num_layers: int) -> list[int]:
    """Every other teacher layer, the first and the last included: 0, 2, 4, …, L−1."""
    layers = list(range(0, num_layers, 2))
    if layers[-1] != num_layers - 1:
        layers.append(num_layers - 1)
    return layers


def check_layers(layers: list[int], num_layers: int, field: str = "distill.student.layers") -> list[int]:
    """``layers`` as given, or a ``UserInputError`` naming ``field`` (empty, out of range, repeated or not
    ascending)."""
    if not layers:
        raise UserInputError(f"{field}: list at least one teacher layer (or remove it for every other layer)")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserInputError(
            f"{field}: layer {bad[0]} does not exist; the teacher has {num_layers} layers (0-{num_layers - 1})"
        )
    seen: set[int] = set()
    for i in layers:
        if i in seen:
            raise UserInputError(f"{field}: layer {i} is listed twice; each teacher layer can be kept once")
        seen.add(i)
    if layers != sorted(layers):
        raise UserInputError(
            f"{field}: {layers} is not in ascending order; list the kept teacher layers in the order they run"
        )
    return list(layers)


def student_config(teacher_config, student) -> tuple[Any, list[int] | None]:
    """(the student's ``LlamaConfig``, the teacher layers it copies or None for ``scratch``)."""
    from ..model.config import LlamaConfig

    base = teacher_config.to_dict()
    given = {k: getattr(student, k) for k in _SHAPE_FIELDS if getattr(student, k) is not None}
    L = teacher_config.num_hidden_layers
    if student.init == "teacher_layers":
        if given:
            name = next(iter(given))
            raise UserInputError(
                f"distill.student.{name}: only for `init: scratch` (a `teacher_layers` student keeps the "
                "teacher's width); remove it or set distill.student.init: scratch"
            )
        layers = check_layers(list(student.layers) if student.layers is not None else default_layers(L), L)
        return LlamaConfig(**{**base, "num_hidden_layers": len(layers)}).validate("distill.student"), layers
    if student.layers is not None:
        raise UserInputError(
            "distill.student.layers: only for `init: teacher_layers`; a `scratch` student takes its depth "
            "from distill.student.num_hidden_layers"
        )
    values = {**base, **given}
    if "num_hidden_layers" not in given:
        values["num_hidden_layers"] = max(1, math.ceil(L / 2))
    if "hidden_size" in given and "intermediate_size" not in given:  # keep the teacher's MLP ratio
        ratio = teacher_config.intermediate_size / teacher_config.hidden_size
        values["intermediate_size"] = max(1, round(ratio * given["hidden_size"]))
    if "hidden_size" in given or "num_attention_heads" in given:
        values["head_dim"] = None  # follows hidden_size / num_attention_heads
    if "num_attention_heads" in given and "num_key_value_heads" not in given:
        ratio = max(1, teacher_config.num_attention_heads // (teacher_config.num_key_value_heads or 1))
        nh = values["num_attention_heads"]
        values["num_key_value_heads"] = nh // ratio if nh % ratio == 0 else nh
    try:
        cfg = LlamaConfig(**values).validate("distill.student")
    except ModelError as err:
        raise UserInputError(str(err)) from None
    return cfg, None


def build_student(teacher: nn.Module, student, *, seed: int = 0):
    """The student ``Llama`` (fp32, CPU) and the teacher layers it copied (None for ``scratch``)."""
    from ..model import Llama

    t = _llama(teacher)
    cfg, layers = student_config(t.config, student)
    torch.manual_seed(seed)
    model = Llama(cfg)
    if layers is None:
        return model, None
    src = t.state_dict()
    state = {}
    for name in model.state_dict():
        if name.startswith("model.layers."):
            j, rest = name.removeprefix("model.layers.").split(".", 1)
            state[name] = src[f"model.layers.{layers[int(j)]}.{rest}"]
        else:
            state[name] = src[name]
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    model.tie_weights()
    model.train()
    return model, layers


# ------------------------------------------------------------------------------------------------------
# teacher top-k on disk
# ------------------------------------------------------------------------------------------------------


class TopkStore:
    """The teacher's top-k (ids int32, log-probs float32 at T = 1) for every stream position of one split."""

    def __init__(self, ids: np.ndarray, logprobs: np.ndarray):
        if ids.shape != logprobs.shape or ids.ndim != 2:
            raise StageInputError(f"top-k arrays disagree: ids {ids.shape}, log-probs {logprobs.shape}")
        self.ids, self.logprobs = ids, logprobs

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def open(cls, folder: Path, split: str) -> TopkStore:
        return cls(
            np.load(folder / f"{split}.ids.npy", mmap_mode="r"),
            np.load(folder / f"{split}.logprobs.npy", mmap_mode="r"),
        )

    def gather(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] stream positions (-1 = padding) → (ids int64, log-probs fp32) [B, T, k]; padding gets zeros
        (those positions have no label, so the loss never reads them)."""
        flat = positions.reshape(-1)
        valid = flat >= 0
        ids = np.zeros((flat.size, self.k), dtype=np.int64)
        lp = np.zeros((flat.size, self.k), dtype=np.float32)
        ids[valid] = self.ids[flat[valid]]
        lp[valid] = self.logprobs[flat[valid]]
        shape = (*positions.shape, self.k)
        return torch.from_numpy(ids.reshape(shape)), torch.from_numpy(lp.reshape(shape))


def row_positions(starts: np.ndarray, lengths: np.ndarray, convs: np.ndarray, seq_len: int) -> np.ndarray:
    """Stream position of each input slot of a row holding conversations ``convs`` (``sft_data``'s layout:
    a conversation of L tokens fills L − 1 slots with its tokens 0..L−2, back to back; -1 = padding)."""
    pos = np.full(seq_len, -1, dtype=np.int64)
    p = 0
    for c in convs.tolist():
        n = int(lengths[c]) - 1
        pos[p : p + n] = np.arange(int(starts[c]), int(starts[c]) + n)
        p += n
    return pos


class TopkBatches(SFTBatches):
    """``SFTBatches`` whose batches also carry the teacher's saved top-k for each position
    (``topk_ids``, ``topk_logprobs`` [B, T, k]), gathered by the rows' stream positions."""

    def __init__(self, split, store: TopkStore, **kwargs: Any):
        super().__init__(split, **kwargs)
        if len(store) != len(split):
            raise StageInputError(
                f"the saved top-k covers {len(store)} positions but the split has {len(split)}; it belongs to "
                "other data — delete runs/distill/topk to recompute it"
            )
        self.store = store

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self._rows
        first = self.cursor + self.rank * self.batch_size
        convs = []
        for g in range(first, first + self.batch_size):
            e, i = self._locate(g)
            convs.append(rows.rows(e)[i])
        batch = super().__next__()
        pos = np.stack([row_positions(rows.starts, rows.lengths, c, self.seq_len) for c in convs])
        batch["topk_ids"], batch["topk_logprobs"] = self.store.gather(pos)
        return batch


def topk_eval_batches(
    split, store: TopkStore, *, seq_len: int, batch_size: int, num_batches: int, rank: int = 0,
    world_size: int = 1, packing: bool = True, pad_id: int = 0, train_on_prompt: bool = False,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """``sft_eval_batches`` (the same rows, in the same order) with the saved top-k added."""
    from .sft_data import _Rows, sft_eval_batches

    batches = sft_eval_batches(
        split, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches, rank=rank,
        world_size=world_size, packing=packing, pad_id=pad_id, train_on_prompt=train_on_prompt,
    )  # fmt: skip
    if not batches:
        return batches
    src = _Rows(
        split, seq_len=seq_len, packing=packing, shuffle=False, seed=0, pad_id=pad_id,
        train_on_prompt=train_on_prompt, pack_window=2048, name="val",
    )  # fmt: skip
    rows, per_global = src.rows(0), batch_size * world_size
    for b, batch in enumerate(batches):
        first = b * per_global + rank * batch_size
        pos = np.stack(
            [row_positions(src.starts, src.lengths, rows[first + j], seq_len) for j in range(batch_size)]
        )
        batch["topk_ids"], batch["topk_logprobs"] = store.gather(pos)
    return batches


@torch.no_grad()
def compute_topk(
    teacher: nn.Module,
    split,
    k: int,
    *,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k (ids, log-probs at T = 1) at every stream position of ``split``.

    Conversations are packed back to back into rows of ``seq_len`` (positions restart, no attention across
    them, so each gets the distributions it would get alone) and run ``batch_size`` rows at a time.
    """
    import contextlib

    t = _llama(teacher)
    V = t.config.vocab_size
    if not 0 < k <= V:
        raise UserInputError(f"distill.topk: must lie in [1, {V}] (the teacher's vocabulary), got {k}")
    starts, lengths = split.document_starts(), split.document_lengths()
    N = len(split)
    ids_out = np.zeros((N, k), dtype=np.int32)
    lp_out = np.zeros((N, k), dtype=np.float32)
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for c in range(len(starts)):
        n = int(lengths[c]) - 1
        if n <= 0:
            continue
        if n > seq_len:
            raise StageInputError(
                f"{split.where}: conversation {c} has {n + 1} tokens, more than seq_len + 1 = {seq_len + 1}"
            )
        if used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(c)
        used += n
    if cur:
        rows.append(cur)
    ctx = autocast or contextlib.nullcontext
    was = t.training
    t.eval()
    for b in range(0, len(rows), batch_size):
        group = rows[b : b + batch_size]
        B = len(group)
        inp = np.zeros((B, seq_len), dtype=np.int64)
        doc = np.full((B, seq_len), -1, dtype=np.int64)
        pos = np.zeros((B, seq_len), dtype=np.int64)
        spos = np.full((B, seq_len), -1, dtype=np.int64)
        for r, convs in enumerate(group):
            p = 0
            for j, c in enumerate(convs):
                n = int(lengths[c]) - 1
                inp[r, p : p + n] = split.read(int(starts[c]), n)
                doc[r, p : p + n] = j
                pos[r, p : p + n] = np.arange(n)
                spos[r, p : p + n] = np.arange(int(starts[c]), int(starts[c]) + n)
                p += n
        dev = torch.device(device)
        with ctx():
            h = t.hidden_states(
                torch.from_numpy(inp).to(dev),
                position_ids=torch.from_numpy(pos).to(dev),
                document_ids=torch.from_numpy(doc).to(dev),
            )
        sel = torch.from_numpy(spos.reshape(-1) >= 0).to(dev)
        hv = h.reshape(-1, h.shape[-1])[sel]
        targets = spos.reshape(-1)[spos.reshape(-1) >= 0]
        # a few thousand rows of logits at a time: the vocabulary may be large
        step = max(1, (1 << 22) // V)
        for s in range(0, hv.shape[0], step):
            z = torch.mm(hv[s : s + step].float(), t.lm_head.weight.float().t())
            logp = torch.log_softmax(z, dim=-1)
            top = torch.topk(logp, k, dim=-1)
            where = targets[s : s + step]
            ids_out[where] = top.indices.to(torch.int32).cpu().numpy()
            lp_out[where] = top.values.cpu().numpy()
    t.train(was)
    return ids_out, lp_out


def teacher_identity(path: Path) -> dict[str, Any]:
    """What identifies a teacher checkpoint cheaply: its folder and every file's size and mtime."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return {
        "path": str(Path(path).resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def ensure_topk(
    teacher: nn.Module,
    index,
    folder: Path,
    *,
    k: int,
    teacher_id: dict[str, Any],
    seq_len: int,
    batch_size: int,
    device,
    autocast=None,
) -> bool:
    """Write ``folder`` (train and val top-k + ``meta.json``) atomically unless it already matches the data,
    the teacher and k. Returns True when it was (re)computed. Rank 0 only."""
    from ..utils.atomic import atomic_dir, write_json

    meta = {
        "format": TOPK_FORMAT,
        "data": index.fingerprint,
        "teacher": teacher_id,
        "k": k,
        "splits": {s: index.num_tokens(s) for s in ("train", "val")},
    }
    try:
        if json.loads((folder / "meta.json").read_text(encoding="utf-8")) == meta:
            log.info("%s: teacher top-%d is up to date; reusing it", folder, k)
            return False
    except (OSError, ValueError):
        pass
    with atomic_dir(folder) as tmp, console.progress("teacher top-k", unit="split") as bar:
        for split in ("train", "val"):
            if index.num_tokens(split):
                ids, lp = compute_topk(
                    teacher, index.open(split), k, seq_len=seq_len, batch_size=batch_size,
                    device=device, autocast=autocast,
                )  # fmt: skip
                np.save(tmp / f"{split}.ids.npy", ids)
                np.save(tmp / f"{split}.logprobs.npy", lp)
            bar.advance(1)
        write_json(tmp / "meta.json", meta)
    return True


# ------------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------------


def run_distill(ctx: StageContext) -> StageResult:
    """The ``distill`` stage (``llmforge train distill``): see the module docstring."""
    from .recipe import relaunch_under_torchrun

    result = relaunch_under_torchrun(ctx, ctx.manifest.distill)
    return result if result is not None else _distill_here(ctx)


def _load_teacher(path: Path, tokenizer_dir: Path, tokenizer) -> nn.Module:
    from .recipe import check_same_tokenizer, load_start_model

    check_same_tokenizer(path, tokenizer_dir, what="teacher")
    teacher = load_start_model(path)
    if teacher.config.vocab_size < tokenizer.info.vocab_size:
        raise StageInputError(
            f"{path}: the teacher's vocabulary ({teacher.config.vocab_size}) is smaller than the project "
            f"tokenizer's ({tokenizer.info.vocab_size}) in {tokenizer_dir}; it was trained with another "
            "tokenizer — set distill.teacher to a model trained with this project's tokenizer"
        )
    return teacher


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _generate_data(
    ctx, cfg, teacher, teacher_src, tokenizer, files, env, device
) -> tuple[Path, dict[str, Any]]:
    """Black-box mode: the teacher's answers as ``runs/distill/generations.jsonl`` (rank 0; reused when the
    teacher, the settings and the prompt files are unchanged)."""
    from . import dist
    from .generations import (
        GENERATIONS_FILE,
        LINEAGE_FILE,
        PromptStats,
        answer_locally,
        answer_with_endpoint,
        api_key_from_env,
        generations_fingerprint,
        read_prompts,
        up_to_date,
        write_generations,
    )
    from .sft import data_files

    g = cfg.generations
    prompt_files = data_files(ctx, g.prompts, "distill.generations.prompts") if g.prompts else files
    settings = {
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "seed": ctx.manifest.project.seed,
    }
    if g.endpoint:
        who: dict[str, Any] = {"endpoint": g.endpoint, "model": g.model}
    else:
        who = {"checkpoint": teacher_identity(teacher_src.path), "chat_template": tokenizer.info.sha256}
    fp = generations_fingerprint(who, settings, prompt_files)
    out = ctx.out_dir / GENERATIONS_FILE
    if env.is_main:
        lineage = up_to_date(ctx.out_dir, fp)
        if lineage is not None:
            log.info("%s: teacher answers are up to date (%d rows); reusing them", out, lineage["count"])
        else:
            stats = PromptStats()
            prompts = read_prompts(prompt_files, stats)
            if not prompts:
                raise StageInputError(
                    f"{', '.join(map(str, prompt_files))}: no prompt to answer ({stats.rows_read} rows; a prompt "
                    "is a conversation ending in a user turn once its last assistant turn is cut)"
                )
            log.info("asking %s for %d answers", g.endpoint or teacher_src.describe(ctx), len(prompts))
            if g.endpoint:
                answers = answer_with_endpoint(
                    prompts,
                    endpoint=g.endpoint,
                    model=g.model,
                    api_key=api_key_from_env(g.api_key_env),
                    max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature,
                    timeout_s=g.timeout_s,
                    seed=ctx.manifest.project.seed,
                )
            else:
                teacher.to(device)  # generation runs where the model's weights are
                answers = answer_locally(
                    teacher,
                    tokenizer,
                    prompts,
                    max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature,
                    seed=ctx.manifest.project.seed,
                )
                teacher.to("cpu")
            lineage = write_generations(
                ctx.out_dir,
                prompts,
                answers,
                fingerprint=fp,
                teacher={**who, "described": g.endpoint or teacher_src.describe(ctx)},
                settings=settings,
                prompt_files=prompt_files,
                prompt_stats=stats,
            )
    dist.barrier()
    lineage = json.loads((ctx.out_dir / LINEAGE_FILE).read_text(encoding="utf-8"))
    return out, lineage


def _distill_here(ctx: StageContext) -> StageResult:
    from ..shards import ShardIndex
    from ..tokenizer.info import load_tokenizer
    from . import dist
    from .loop import Objective, resolve_precision, train
    from .recipe import base_identity, export_model, resolve_model, train_metrics, train_summary, training_env
    from .sft import data_files, prepare_data, sft_loss
    from .sft_data import sft_eval_batches

    m = ctx.manifest
    cfg, project = m.distill, m.project
    tokenizer_dir = ctx.input("tokenizer", "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    teacher_src = resolve_model(ctx, cfg.teacher, "distill.teacher")
    black_box = cfg.mode == "generations"
    if black_box and cfg.topk:
        raise UserInputError(
            "distill.topk: saved teacher top-k is for `mode: logits`; remove it for `mode: generations`"
        )
    data_field = "distill.data" if cfg.data else "sft.data"
    files = data_files(ctx, cfg.data or m.sft.data, data_field) if (cfg.data or m.sft.data) else []
    if not files and not (black_box and cfg.generations.prompts):
        raise UserInputError(
            "distill.data: no data files; list JSONL or Parquet conversations (or set sft.data, its default)"
        )
    env, device = training_env(project)
    amp = resolve_precision(cfg.precision, device)

    teacher = _load_teacher(teacher_src.path, tokenizer_dir, tokenizer)
    student, layers = build_student(teacher, cfg.student, seed=project.seed)
    if cfg.seq_len > student.config.max_position_embeddings:
        raise UserInputError(
            f"distill.seq_len ({cfg.seq_len}) is longer than the teacher's max_position_embeddings "
            f"({student.config.max_position_embeddings}); lower distill.seq_len"
        )

    # -- data: the conversations (or the teacher's answers), tokenized once into masked shards -------------
    lineage = None
    if black_box:
        gen_file, lineage = _generate_data(ctx, cfg, teacher, teacher_src, tokenizer, files, env, device)
        files = [gen_file]
    data_dir = ctx.out_dir / "data"
    stats = prepare_data(files, tokenizer_dir, data_dir, cfg, project.seed, env)
    index = ShardIndex.load(data_dir)
    pad_id = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id
    common = dict(
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        packing=cfg.packing,
        pad_id=pad_id,
        train_on_prompt=cfg.train_on_prompt,
    )
    has_val = bool(index.num_tokens("val"))

    def autocast():
        import contextlib

        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    frozen: dict[str, nn.Module] = {}
    if black_box:
        loss_fn: Any = sft_loss
        data = SFTBatches(index.open("train"), seed=project.seed, **common)
        val = sft_eval_batches(index.open("val"), num_batches=cfg.eval_batches, **common) if has_val else []
    elif cfg.topk:
        topk_dir = ctx.out_dir / "topk"
        if env.is_main:
            teacher.to(device)
            ensure_topk(
                teacher,
                index,
                topk_dir,
                k=cfg.topk,
                teacher_id=teacher_identity(teacher_src.path),
                seq_len=cfg.seq_len,
                batch_size=cfg.batch_size,
                device=device,
                autocast=autocast,
            )
        dist.barrier()
        teacher.to("cpu")  # not needed beside the student while training; back for the held-out KL
        loss_fn = DistillLoss(None, cfg.alpha, cfg.divergence, cfg.temperature, cfg.jsd_beta)
        data = TopkBatches(
            index.open("train"), TopkStore.open(topk_dir, "train"), seed=project.seed, **common
        )
        val = (
            topk_eval_batches(
                index.open("val"), TopkStore.open(topk_dir, "val"), num_batches=cfg.eval_batches, **common
            )
            if has_val
            else []
        )
    else:
        frozen = {"teacher": teacher}
        loss_fn = DistillLoss(teacher, cfg.alpha, cfg.divergence, cfg.temperature, cfg.jsd_beta)
        data = SFTBatches(index.open("train"), seed=project.seed, **common)
        val = sft_eval_batches(index.open("val"), num_batches=cfg.eval_batches, **common) if has_val else []
    if not val:
        log.warning("no distillation validation data (the val split is smaller than one batch)")

    # -- train ---------------------------------------------------------------------------------------------
    from .stage import HFModelIO

    model_io = HFModelIO(student.config, tokenizer_dir, tokenizer.info.generation_config())
    if cfg.wandb.enabled and cfg.wandb.project is None:
        cfg = cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"project": project.name})})
    rc = {
        "distill": cfg.semantic_dump(),
        "seed": project.seed,
        "teacher": {**base_identity(ctx, teacher_src.path), "config": teacher.config.to_dict()},
        "student": {"config": student.config.to_dict(), "layers": layers},
        "data": index.fingerprint,
        "generations": lineage["fingerprint"] if lineage else None,
    }
    resume: str | Path = cfg.resume
    if resume not in ("auto", "false"):
        resume = ctx.resolve(resume)
    if resume == "auto":
        from .recipe import set_aside_foreign_checkpoints

        if env.is_main:
            set_aside_foreign_checkpoints(
                ctx.out_dir / "checkpoints", rc, force=bool(ctx.options.get("force")), field="distill.resume"
            )
        dist.barrier()
    objective = Objective("distill", loss_fn, data, val_data=(lambda: val) if val else None, frozen=frozen)
    result = train(
        student,
        objective,
        cfg,
        run_dir=ctx.out_dir,
        device=device,
        seed=project.seed,
        model_io=model_io,
        run_config=rc,
        resume=resume,
        description="distill",
        env=env,
        frozen_dtype=amp if frozen and device.type == "cuda" else None,
    )
    final = export_model(result.checkpoint, ctx.out_dir, env)

    # -- held-out comparison with the teacher ----------------------------------------------------------------
    metrics = train_metrics(result, env)
    judged = None
    if val and not (black_box and cfg.generations.endpoint):
        teacher.to(device)
        judged = heldout_kl(student, teacher, val, device, autocast)
        teacher.to("cpu")
    t_params, s_params = teacher.num_parameters(), student.num_parameters()
    metrics.update(
        {
            "mode": cfg.mode,
            "val_kl": judged["kl"] if judged else None,
            "val_ce_student": judged["student_ce"] if judged else None,
            "val_ce_teacher": judged["teacher_ce"] if judged else None,
            "teacher_params": t_params,
            "student_params": s_params,
            "student_layers": student.config.num_hidden_layers,
            "teacher_layers": teacher.config.num_hidden_layers,
            "conversations": stats.kept,
            "skipped_rows": stats.num_skipped,
            "truncated": stats.truncated,
        }
    )
    outputs: dict[str, Path] = {"model": final}
    if black_box:
        outputs["generations"] = ctx.out_dir / "generations.jsonl"
        metrics["generations"] = lineage["count"]
    report = {
        "teacher": teacher_src.describe(ctx),
        "student": {"init": cfg.student.init, "layers": layers, "config": student.config.to_dict()},
        "data": stats.to_dict(),
        "heldout": judged,
        "generations": lineage,
    }
    if env.is_main:
        from ..utils.atomic import write_json

        write_json(ctx.out_dir / "report.json", report)

    summary = train_summary(ctx, result, student.config, final)
    init = (
        f"teacher layers {layers}" if layers is not None else f"scratch ({student.config.hidden_size} wide)"
    )
    summary.insert(0, ("teacher", teacher_src.describe(ctx)))
    summary.insert(
        1,
        (
            "student",
            f"{_params(s_params)} vs teacher {_params(t_params)} ({s_params / t_params:.0%}), "
            f"{student.config.num_hidden_layers}/{teacher.config.num_hidden_layers} layers, {init}",
        ),
    )
    if black_box:
        src = cfg.generations.endpoint or "local generation"
        summary.insert(2, ("teacher answers", f"{lineage['count']:,} from {src} → generations.jsonl"))
    else:
        how = f"top-{cfg.topk} saved" if cfg.topk else "logits on the fly"
        summary.insert(
            2,
            (
                "objective",
                f"{cfg.alpha:g}·{cfg.divergence} (T={cfg.temperature:g}) + {1 - cfg.alpha:g}·CE, {how}",
            ),
        )
    if judged:
        summary.append(
            (
                "held-out KL / CE",
                f"KL(teacher‖student) {judged['kl']:.4f}; CE student {judged['student_ce']:.4f}, "
                f"teacher {judged['teacher_ce']:.4f}",
            )
        )
    return StageResult(outputs=outputs, metrics=metrics, summary=summary)
