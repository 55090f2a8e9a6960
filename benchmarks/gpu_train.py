"""Training throughput of the project's loop on one GPU: Qwen2-0.5B shape, bf16, eager vs torch.compile.

Runs where only torch + transformers + pydantic are installed (no Ray, no MLflow): it drives
``components.trainloop.train_step`` -- the step every Ray Train worker runs -- on random tokens.

    python benchmarks/gpu_train.py                 # H200: B8 x 1024, eager and compile
    python benchmarks/gpu_train.py --tiny          # CPU smoke run: tiny config, few steps

MFU counts 6N + 12*L*d*T FLOPs per token (N parameters, L layers, d hidden size, T sequence
length) against the accelerator's dense bf16 peak (989 TFLOP/s for an H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, without installing it

RESULTS = Path(__file__).resolve().parent / "results"


def _config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    # Qwen2-0.5B's shape; it ties input and output embeddings, so N counts them once.
    return Qwen2Config(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*d*T for attention scores."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def run_mode(args: argparse.Namespace, compiled: bool) -> dict:
    """Train ``args.steps`` steps (after warm-up) through the project's step function; measure."""
    import torch
    from transformers import AutoModelForCausalLM

    from components.schemas import TrainParams
    from components.trainloop import autocast_context, make_optimizer, make_scheduler, train_step

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    config = _config(args.tiny)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    n_params = model.num_parameters()
    total_steps = args.warmup + args.steps
    params = TrainParams(
        max_steps=total_steps, learning_rate=1e-4, warmup_steps=args.warmup, batch_size=args.batch, bf16=True
    )
    optimizer = make_optimizer(model, params)
    scheduler = make_scheduler(optimizer, params)
    runner = torch.compile(model, backend=args.compile_backend) if compiled else model

    generator = torch.Generator().manual_seed(0)

    def _batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)
        ids = ids.to(device, non_blocking=True)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def _autocast():
        return autocast_context(device, bf16=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.warmup):  # compilation and allocator warm-up happen here
        train_step(runner, [_batch()], optimizer, scheduler, max_grad_norm=1.0, autocast=_autocast)
    warmup_s = time.perf_counter() - started
    losses = []
    started = time.perf_counter()
    for _ in range(args.steps):
        stats = train_step(runner, [_batch()], optimizer, scheduler, max_grad_norm=1.0, autocast=_autocast)
        losses.append(stats.loss)  # train_step syncs once per step (it reads the loss)
    seconds = time.perf_counter() - started
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    fpt = flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, args.seq)
    return {
        # bf16 autocast applies on GPU only (the loop's rule); a CPU run is fp32.
        "mode": f"{'bf16' if device.type == 'cuda' else 'fp32'} {'+ compile' if compiled else 'eager'}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": n_params,
        "batch": args.batch,
        "seq_len": args.seq,
        "steps": args.steps,
        "warmup_seconds": round(warmup_s, 2),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "tokens_per_second": round(tokens_per_s, 1),
        "mfu": tokens_per_s * fpt / (args.peak_tflops * 1e12),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "final_loss": round(losses[-1], 4),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run the requested modes, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and few steps (CPU smoke test)")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is visible")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 5; tiny 1)")
    parser.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the accelerator")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON results file (default results/gpu_train*.json)"
    )
    args = parser.parse_args(argv)
    small = {"batch": 2, "seq": 64, "steps": 3, "warmup": 1}
    big = {"batch": 8, "seq": 1024, "steps": 20, "warmup": 5}
    for key, value in (small if args.tiny else big).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("eager", "compile"):
            parser.error(f"unknown mode {mode!r}")
        rows.append(run_mode(args, compiled=mode == "compile"))
        _free_memory()

    print(f"{'mode':<16}{'tokens/s':>12}{'step ms':>10}{'MFU':>8}{'peak GiB':>10}{'warm-up s':>11}")
    for r in rows:
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        print(
            f"{r['mode']:<16}{r['tokens_per_second']:>12,.0f}{r['step_ms']:>10.1f}"
            f"{100 * r['mfu']:>7.1f}%{peak:>10}{r['warmup_seconds']:>11.1f}"
        )
    out = args.out or RESULTS / ("gpu_train_tiny.json" if args.tiny else "gpu_train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": "tiny" if args.tiny else "qwen2-0.5b-shape", "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return rows


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
