"""The fine-tuning loop: plain PyTorch + transformers, shared by Ray Train workers and one-process runs.

Nothing here imports Ray or MLflow (the GPU benchmark machine has neither). Ray-specific calls
(report, get_checkpoint, world rank, DDP wrapping) go through a small :class:`LoopSession`
adapter; :class:`LocalSession` is the one-process implementation and ``components.train``
holds the Ray one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from components.schemas import DatasetRef, LoraParams, TrainParams

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from components.settings import Settings

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
WEIGHTS_FILE = "model.safetensors"
OPTIM_FILE = "trainer_state.pt"
STATE_FILE = "state.json"
EXPORT_DIR = "export"

# The run's final train loss is the mean of its last this many step losses.
_LOSS_TAIL = 10

Record = dict[str, float]
LogFn = Callable[[Record], None]


# Data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized SFT example: the loss falls only where ``labels`` is not -100."""

    input_ids: list[int]
    labels: list[int]
    question: tuple[int, int] = (0, 0)  # where the customer's words lie in ``input_ids``


def build_examples(
    rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> list[Example]:
    """Tokenize SFT rows with the one prompt template; prompt and padding are masked from the loss.

    The context is tokenized on its own (as serving tokenizes a prompt) and the target, which
    ends in the EOS token, is appended; the concatenation is truncated to ``max_seq_len``.
    Rows with no target token left after truncation are dropped.

    Args:
        rows: dicts with ``prompt`` and ``response``.
        tokenizer: the base model's tokenizer (its ``eos_token`` ends every target).
        max_seq_len: longest sequence kept, in tokens.

    Returns:
        Examples in the order of ``rows``.
    """
    from components.prompt import PROMPT_TEMPLATE, format_example

    pairs = [format_example(r["prompt"], r["response"], tokenizer.eos_token) for r in rows]
    if not pairs:
        return []
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=True)["input_ids"]
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    head, tail = PROMPT_TEMPLATE.split("{prompt}")
    head_ids = list(tokenizer(head, add_special_tokens=True)["input_ids"])
    tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    examples = []
    for ctx, tgt in zip(contexts, targets, strict=True):
        ids = (list(ctx) + list(tgt))[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(ctx) + list(tgt))[:max_seq_len]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            end = len(ctx) - len(tail_ids)
            framed = ctx[: len(head_ids)] == head_ids and ctx[end:] == tail_ids and len(ids) > len(ctx)
            examples.append(Example(ids, labels, (len(head_ids), end) if framed else (0, 0)))
    return examples


def drop_question_tokens(example: Example, p: float, rng: random.Random) -> Example:
    """The example with each token of its question dropped with chance ``p`` (at least one stays).

    The template around the question and the target are kept whole, so the model still learns
    the full answer from a question with words missing.
    """
    start, end = example.question
    if p <= 0 or end - start < 2:
        return example
    kept = [t for t in example.input_ids[start:end] if rng.random() >= p]
    if not kept:
        kept = [example.input_ids[start + rng.randrange(end - start)]]
    return Example(
        example.input_ids[:start] + kept + example.input_ids[end:],
        example.labels[:start] + [IGNORE_INDEX] * len(kept) + example.labels[end:],
        (start, start + len(kept)),
    )


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; padding is masked from attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchSchedule:
    """Which examples each rank sees in each micro-batch: seeded shuffle per epoch, sharded by rank.

    Positions are a pure function of the micro-batch index, so resuming at optimizer step
    ``s`` continues exactly where the data stream left off (no data-loader state to save).
    """

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # one epoch at a time is all a stream needs
        return self._perms[epoch]

    def micro_batch(self, k: int) -> list[int]:
        """Example indices of this rank's ``k``-th micro-batch."""
        start = (k * self.world_size + self.rank) * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def spread(rows: Sequence[Any], k: int) -> list[Any]:
    """``k`` rows evenly spaced over ``rows`` (all of them if there are fewer)."""
    if len(rows) <= k:
        return list(rows)
    return [rows[(i * len(rows)) // k] for i in range(k)]


# Optimization ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    loss: float
    tokens: int
    target_tokens: int
    grad_norm: float


def make_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": params.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=params.learning_rate)


def make_scheduler(
    optimizer: torch.optim.Optimizer, params: TrainParams
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero at ``max_steps``."""
    from transformers import get_cosine_schedule_with_warmup

    warmup = min(params.warmup_steps, max(params.max_steps - 1, 0))
    return get_cosine_schedule_with_warmup(optimizer, warmup, params.max_steps)


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU when asked; full precision elsewhere."""
    import torch

    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    max_grad_norm: float | None,
    label_smoothing: float = 0.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepStats:
    """One optimizer step over ``micro_batches`` (gradient accumulation), on the batches' device.

    Each micro-batch's mean loss is weighted by its share of target tokens, so the step's loss
    is the mean over every target token of the step, whatever the padding. Under DDP the
    gradient all-reduce runs only on the last micro-batch. With ``label_smoothing`` the loss is
    cross-entropy against smoothed targets (the reported loss then includes the smoothing).
    """
    import torch

    model.train()
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
    total = max(sum(counts), 1)
    loss_sum = None
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                if label_smoothing:
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                    mean = next_token_loss(logits, batch["labels"], label_smoothing=label_smoothing)
                else:
                    mean = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        labels=batch["labels"],
                    ).loss
            loss = mean * (counts[i] / total)
            loss.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(
        loss=float(loss_sum),  # one device sync per step
        tokens=sum(int(b["attention_mask"].sum()) for b in micro_batches),
        target_tokens=sum(counts),
        grad_norm=float(grad_norm),
    )


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token, masked positions skipped.

    ``kwargs`` go to ``torch.nn.functional.cross_entropy`` (``reduction``, ``label_smoothing``).
    """
    import torch.nn.functional as F  # noqa: N812

    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        **kwargs,
    )


def eval_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    bf16: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean loss per target token over ``examples`` (loss only, no generation).

    With several ranks each scores its shard and the sums are all-reduced, so every rank
    returns the same number.
    """
    import torch

    device = device or next(model.parameters()).device
    shard = list(examples)[rank::world_size]
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(shard), batch_size):
            batch = {
                k: v.to(device) for k, v in collate(shard[start : start + batch_size], pad_token_id).items()
            }
            with autocast_context(device, bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            loss = next_token_loss(logits, batch["labels"], reduction="sum")
            sums += torch.stack([loss.double(), (targets != IGNORE_INDEX).sum().double()])
    model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
    return float(sums[0] / sums[1].clamp(min=1))


# Checkpoints -------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: Mapping[str, Any],
) -> Path:
    """Write the training state: weights (safetensors), optimizer + scheduler + RNG, counters (JSON)."""
    import torch
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / WEIGHTS_FILE))  # handles tied weights, unlike save_file
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
        path / OPTIM_FILE,
    )
    (path / STATE_FILE).write_text(json.dumps(dict(state), sort_keys=True))
    return path


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote, in place; returns the saved counters."""
    import torch
    from safetensors.torch import load_model

    path = Path(path)
    load_model(model, str(path / WEIGHTS_FILE), device=str(next(model.parameters()).device))
    # weights_only: the trainer state holds tensors and numbers only, never arbitrary pickles.
    blob = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["rng"]["cuda"])
    return json.loads((path / STATE_FILE).read_text())


def export_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> tuple[PreTrainedModel, Path]:
    """Save a servable Hugging Face folder (safetensors); LoRA adapters are merged first.

    Returns:
        The exported (merged) model and ``out_dir``.
    """
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model, out_dir


def apply_lora(model: PreTrainedModel, lora: LoraParams) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# Sessions: where the loop runs -------------------------------------------------------------


class LoopSession(Protocol):
    """What the loop needs from whoever runs it (one process, or a Ray Train worker)."""

    world_rank: int
    world_size: int
    local_world_size: int
    checkpointing: bool

    def device(self, use_gpu: bool) -> torch.device:
        """The device this worker trains on."""
        ...

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make the model data-parallel across workers (identity for one process)."""
        ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local folder holding the checkpoint to resume from, if any."""
        ...

    def report(self, metrics: Mapping[str, float], checkpoint_dir: Path | None) -> None:
        """Persist a checkpoint (rank 0 passes a folder, others None); a barrier across workers."""
        ...

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint reported so far is registered for resuming."""
        ...


class LocalSession:
    """One process, no Ray: checkpoints are copied under ``checkpoint_root`` (if given)."""

    world_rank = 0
    world_size = 1
    local_world_size = 1

    def __init__(self, checkpoint_root: Path | None = None, num_to_keep: int = 2) -> None:
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.num_to_keep = num_to_keep
        self.checkpointing = self.checkpoint_root is not None
        self.last_checkpoint: Path | None = None

    def device(self, use_gpu: bool) -> torch.device:
        import torch

        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu=True but no CUDA device is visible")
        return torch.device("cuda" if use_gpu else "cpu")

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_root or not self.checkpoint_root.exists():
            return []
        return sorted(p for p in self.checkpoint_root.glob("checkpoint_*") if (p / STATE_FILE).exists())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self._checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: Mapping[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None or self.checkpoint_root is None:
            return
        target = self.checkpoint_root / f"checkpoint_{int(metrics['step']):06d}"
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(checkpoint_dir, partial)
        shutil.rmtree(target, ignore_errors=True)
        # A kill during the copy leaves only the hidden partial folder: never a half checkpoint to resume.
        partial.rename(target)
        self.last_checkpoint = target
        for old in self._checkpoints()[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    def wait_for_checkpoints(self) -> None:
        return None  # report() copies synchronously


# The per-worker routine --------------------------------------------------------------------

# Called at the start of every optimizer step with the step number and the session: how a
# test injects a fault (it must be picklable to reach Ray workers). None in production.
StepHook = Callable[[int, "LoopSession"], None]


@dataclass
class WorkerOutput:
    """What one worker's run produced; ``model`` and ``tokenizer`` only on rank 0."""

    steps: int
    metrics: dict[str, float]
    resumed_from_step: int
    history: list[Record] = field(default_factory=list)
    model: PreTrainedModel | None = None
    tokenizer: PreTrainedTokenizerBase | None = None


def worker_config(
    dataset_dir: Path | str,
    params: TrainParams,
    base_model: str,
    *,
    export: bool = False,
    on_step: StepHook | None = None,
) -> dict[str, Any]:
    """The small, picklable config a worker needs: paths and the params dict, never big objects.

    Args:
        dataset_dir: local folder of the dataset snapshot (a path, never a ``file://`` URI).
        params: hyper-parameters.
        base_model: path or HF id of the model to fine-tune.
        export: put the servable (merged) model under ``export/`` in the final checkpoint.
        on_step: called as ``on_step(step, session)`` before each optimizer step (tests inject
            faults with it).

    Returns:
        The config :func:`run_worker` takes.
    """
    return {
        "dataset_dir": str(dataset_dir),
        "params": params.model_dump(mode="json"),
        "base_model": base_model,
        "export": export,
        "on_step": on_step,
    }


@dataclass
class _Job:
    """What one worker trains with, loaded once; ``model`` is the (maybe LoRA-wrapped) unwrapped model."""

    params: TrainParams
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    train_ex: list[Example]
    eval_ex: list[Example]

    def evaluate(self, rank: int, world: int) -> float:
        """Eval loss over the eval examples, all-reduced over the ranks."""
        return eval_loss(
            self.model,
            self.eval_ex,
            self.tokenizer.pad_token_id,
            device=self.device,
            bf16=self.params.bf16,
            rank=rank,
            world_size=world,
        )


def _set_threads(params: TrainParams, session: LoopSession, device: torch.device) -> None:
    import torch

    if device.type == "cpu":
        # Workers on one node share its cores: oversubscribed threads cost more than they give.
        fair_share = max(1, (os.cpu_count() or 1) // max(session.local_world_size, 1))
        torch.set_num_threads(params.cpu_threads or fair_share)


def _load_job(config: Mapping[str, Any], session: LoopSession) -> _Job:
    """Tokenizer, model (LoRA-wrapped when asked, on the device) and tokenized splits of one worker."""
    import torch
    from transformers import AutoModelForCausalLM

    from components.base_model import load_tokenizer
    from components.data import read_split
    from components.errors import InvalidInput

    params = TrainParams.model_validate(config["params"])
    device = session.device(params.use_gpu)
    _set_threads(params, session, device)
    threads = torch.get_num_threads()
    log.info("rank %d/%d on %s, %d torch threads", session.world_rank, session.world_size, device, threads)
    torch.manual_seed(params.seed)
    tokenizer = load_tokenizer(config["base_model"])
    model = AutoModelForCausalLM.from_pretrained(
        config["base_model"], use_safetensors=True, dtype=torch.float32
    )
    if params.lora is not None:
        model = apply_lora(model, params.lora)
    model.to(device)
    folder = config["dataset_dir"]
    train_ex = build_examples(read_split(folder, "train"), tokenizer, params.max_seq_len)
    if not train_ex:
        # A deterministic data error: no restart can fix it, so say what is wrong.
        raise InvalidInput(f"{folder}: no training examples (train split empty, or every row > max_seq_len)")
    eval_rows = spread(read_split(folder, "eval"), params.eval_examples)
    eval_ex = build_examples(eval_rows, tokenizer, params.max_seq_len)
    return _Job(params, device, tokenizer, model, train_ex, eval_ex)


def _restore(
    session: LoopSession, job: _Job, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """The loop's counters, from the session's latest checkpoint (model and optimizer restored in place)."""
    state: dict[str, Any] = {"step": 0, "tokens": 0, "train_seconds": 0.0, "base_eval_loss": None}
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            state.update(load_checkpoint(ckpt, job.model, optimizer, scheduler))
            log.info("rank %d resumed from step %d (%s)", session.world_rank, state["step"], ckpt)
    return state


def _micro_batches(job: _Job, schedule: BatchSchedule, step: int) -> list[dict[str, torch.Tensor]]:
    """The ``grad_accum`` micro-batches of optimizer step ``step`` (1-based), on the job's device."""
    first = (step - 1) * job.params.grad_accum
    pad_id, p = job.tokenizer.pad_token_id, job.params.prompt_dropout
    batches = []
    for j in range(job.params.grad_accum):
        examples = [job.train_ex[i] for i in schedule.micro_batch(first + j)]
        if p:  # drawn from the micro-batch's position, so a resumed run drops the same tokens
            rng = random.Random(f"{job.params.seed}:{schedule.rank}:{first + j}")
            examples = [drop_question_tokens(e, p, rng) for e in examples]
        batches.append({k: v.to(job.device, non_blocking=True) for k, v in collate(examples, pad_id).items()})
    return batches


def _train_steps(
    job: _Job,
    session: LoopSession,
    objects: tuple[torch.nn.Module, torch.optim.Optimizer, Any],
    state: dict[str, Any],
    emit: LogFn,
    on_step: StepHook | None,
) -> list[Record]:
    """Optimizer steps from ``state["step"] + 1`` to ``max_steps``: evals and periodic checkpoints.

    The final checkpoint is the caller's (it may also export the model).

    Returns:
        The per-step records of this incarnation of the run.
    """
    import torch

    params, world = job.params, session.world_size
    wrapped, optimizer, scheduler = objects
    if params.compile:
        wrapped = torch.compile(wrapped)
    schedule = BatchSchedule(len(job.train_ex), params.batch_size, world, session.world_rank, params.seed)
    history: list[Record] = []
    for step in range(int(state["step"]) + 1, params.max_steps + 1):
        if on_step is not None:
            on_step(step, session)
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        stats = train_step(
            wrapped,
            _micro_batches(job, schedule, step),
            optimizer,
            scheduler,
            max_grad_norm=params.max_grad_norm,
            label_smoothing=params.label_smoothing,
            autocast=lambda: autocast_context(job.device, params.bf16),
        )
        seconds = time.perf_counter() - started
        # Ranks' micro-batches hold the same number of rows: world x local tokens ~ the global rate.
        state.update(step=step, tokens=state["tokens"] + stats.tokens * world)
        state["train_seconds"] += seconds
        # Saved with each checkpoint: a run resumed near (or at) its end still reports its train loss.
        state["loss_tail"] = [*state.get("loss_tail", []), stats.loss][-_LOSS_TAIL:]
        record = {
            "step": step,
            "train_loss": stats.loss,
            "learning_rate": lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_second": stats.tokens * world / max(seconds, 1e-9),
        }
        history.append(record)
        emit(record)
        final = step == params.max_steps
        if final or (params.eval_every and step % params.eval_every == 0):
            state["eval_loss"] = job.evaluate(session.world_rank, world) if job.eval_ex else math.nan
            emit({"step": step, "eval_loss": state["eval_loss"]})
        if not final and step % params.checkpoint_every == 0:
            _checkpoint(session, state, {}, (job.model, optimizer, scheduler, job.tokenizer), export=False)
    return history


def run_worker(config: Mapping[str, Any], session: LoopSession, on_log: LogFn | None = None) -> WorkerOutput:
    """Fine-tune the base model on the dataset folder: the loop every worker (or one process) runs.

    Loads its own tokenizer, model and data shard; resumes from the session's checkpoint when
    there is one; checkpoints every ``checkpoint_every`` steps and at the end (the final one
    also holds the exported model under ``export/``). ``config["on_step"]``, when set, is
    called before each step.

    Args:
        config: from :func:`worker_config`.
        session: the adapter to the runner (Ray Train or one process).
        on_log: called on rank 0 with each metrics record (``step`` plus values).

    Returns:
        Steps done, final metrics, and on rank 0 the trained (merged) model and tokenizer.
    """
    job = _load_job(config, session)
    rank, world = session.world_rank, session.world_size
    emit = on_log if (on_log is not None and rank == 0) else (lambda record: None)
    optimizer = make_optimizer(job.model, job.params)
    scheduler = make_scheduler(optimizer, job.params)
    state = _restore(session, job, optimizer, scheduler)
    resumed_from = int(state["step"])
    if state["base_eval_loss"] is None and job.eval_ex:
        state["base_eval_loss"] = job.evaluate(rank, world)
        emit({"step": 0, "base_eval_loss": state["base_eval_loss"]})
    if resumed_from:
        emit({"step": resumed_from, "resumed_from_step": resumed_from})

    history = _train_steps(
        job,
        session,
        (session.wrap_model(job.model), optimizer, scheduler),
        state,
        emit,
        config.get("on_step"),
    )
    metrics = _summary(state, history)
    # Also after a resume from the final checkpoint: the runner's result is the last one reported.
    exported = _checkpoint(
        session,
        state,
        metrics,
        (job.model, optimizer, scheduler, job.tokenizer),
        export=bool(config.get("export")),
    )
    out_model = None
    if rank == 0:
        out_model = exported if exported is not None else _merged(job.model)
    return WorkerOutput(
        steps=int(state["step"]),
        metrics=metrics,
        resumed_from_step=resumed_from,
        history=history,
        model=out_model,
        tokenizer=job.tokenizer if rank == 0 else None,
    )


def _merged(model: torch.nn.Module) -> PreTrainedModel:
    """The plain model: LoRA adapters merged into the base weights (a plain model as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _summary(state: Mapping[str, Any], history: Sequence[Record]) -> dict[str, float]:
    """The run's headline numbers (train loss and tokens/s over every incarnation of the run, not just this one)."""

    def _num(value: float | None) -> float:
        return math.nan if value is None else float(value)

    return {
        "train_loss": _tail_mean(state.get("loss_tail") or [r["train_loss"] for r in history], _LOSS_TAIL),
        "eval_loss": _num(state.get("eval_loss")),
        "base_eval_loss": _num(state.get("base_eval_loss")),
        "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_seconds": float(state["train_seconds"]),
    }


def _checkpoint(
    session: LoopSession,
    state: Mapping[str, Any],
    metrics: Mapping[str, float],
    objects: tuple[torch.nn.Module, torch.optim.Optimizer, Any, PreTrainedTokenizerBase],
    export: bool,
) -> PreTrainedModel | None:
    """Save and report a checkpoint (rank 0 writes it); with ``export`` it also holds the merged model.

    Returns:
        The merged model when it exported one (training is over then), else None.
    """
    if not session.checkpointing:
        return None
    model, optimizer, scheduler, tokenizer = objects
    metrics = {**metrics, "step": float(state["step"])}
    if session.world_rank != 0:
        session.report(metrics, None)  # report is a barrier: every rank calls it
        return None
    exported = None
    with tempfile.TemporaryDirectory(prefix="flywheel-ckpt-") as tmp:
        # Training state first (pre-merge), so a resume from this checkpoint sees the same shapes.
        save_checkpoint(Path(tmp), model, optimizer, scheduler, state)
        if export:
            exported, _ = export_model(model, tokenizer, Path(tmp) / EXPORT_DIR)
        session.report(metrics, Path(tmp))
    return exported


def _tail_mean(values: Sequence[float], n: int = _LOSS_TAIL) -> float:
    """Mean of the last ``n`` values: a less noisy final training loss than the last step's."""
    tail = list(values)[-n:]
    return sum(tail) / len(tail) if tail else math.nan


# One-process entry point -------------------------------------------------------------------


@dataclass
class FitResult:
    """A model fine-tuned in this process, with what the loop measured."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    steps: int
    metrics: dict[str, float]
    history: list[Record]
    resumed_from_step: int = 0
    checkpoint_dir: Path | None = None
    output_dir: Path | None = None


def fit(
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    progress: Callable[[dict], None] | None = None,
    *,
    output_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    on_log: LogFn | None = None,
    on_step: StepHook | None = None,
) -> FitResult:
    """Fine-tune in this process, without Ray or MLflow (same loop as the Ray Train workers).

    Args:
        ref: dataset snapshot (``train`` split trains, ``eval`` split scores).
        params: hyper-parameters; ``workers`` is ignored (one process).
        settings: where the base model is when ``params.base_model`` is unset.
        progress: called with ``{"step", "loss", ...}`` after each step.
        output_dir: if set, the fine-tuned model + tokenizer are saved there (safetensors).
        checkpoint_dir: if set, checkpoints go there and an existing one is resumed from.
        on_log: called with every metrics record (train steps, evals).
        on_step: called as ``on_step(step, session)`` before each optimizer step.

    Returns:
        The fine-tuned (LoRA-merged) model, its tokenizer, steps and metrics.
    """
    from components.uris import to_path

    base_model = params.base_model or settings.base_model_ref

    def _log(record: Record) -> None:
        if on_log is not None:
            on_log(record)
        if progress is not None and "train_loss" in record:
            progress({**record, "loss": record["train_loss"], "max_steps": params.max_steps})

    session = LocalSession(checkpoint_dir)
    config = worker_config(to_path(ref.uri), params, base_model, on_step=on_step)
    out = run_worker(config, session, _log)
    assert out.model is not None and out.tokenizer is not None  # rank 0 of one
    saved = None
    if output_dir is not None:
        _, saved = export_model(out.model, out.tokenizer, Path(output_dir))
    return FitResult(
        model=out.model,
        tokenizer=out.tokenizer,
        steps=out.steps,
        metrics=out.metrics,
        history=out.history,
        resumed_from_step=out.resumed_from_step,
        checkpoint_dir=session.last_checkpoint,
        output_dir=saved,
    )
