"""The GPU training benchmark stays runnable: its --tiny CPU path through the project's loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit


def test_gpu_bench_tiny_runs_on_cpu_without_ray_or_mlflow(tmp_path):
    out = tmp_path / "gpu_train_tiny.json"
    # aot_eager exercises torch.compile's graph capture without a C++ toolchain build.
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['gpu_train.py', '--tiny', '--cpu', '--compile-backend', 'aot_eager', '--out', {str(out)!r}]\n"
        "runpy.run_path('benchmarks/gpu_train.py', run_name='__main__')\n"
        "heavy = sorted(m for m in ('ray', 'mlflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout and "MFU" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["fp32 eager", "fp32 + compile"]
    for r in results:
        assert r["tokens_per_second"] > 0 and r["mfu"] > 0 and r["params"] > 0
        assert r["final_loss"] == r["final_loss"]  # not NaN


def _bench():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_train
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    return gpu_train


def _counted_flops_per_token(config, device: str, batch: int, seq: int) -> tuple[int, float]:
    """Parameters and FLOPs per token that torch's FlopCounterMode counts for one training step.

    The count comes from the matmuls actually dispatched (forward and backward), so it is
    independent of the benchmark's closed formula. Eager attention keeps the score matmuls visible.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ids = torch.zeros((batch, seq), dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return model.num_parameters(), counter.get_total_flops() / (batch * seq)


@pytest.mark.parametrize(
    ("tiny", "device", "batch", "seq"),
    [
        (True, "cpu", 2, 64),  # attention is ~13 % of the FLOPs here: a formula without it fails
        (False, "meta", 1, 1024),  # the measured shape; meta tensors: shapes only, no 2 GB of weights
    ],
)
def test_flops_per_token_matches_the_counted_flops(tiny, device, batch, seq):
    bench = _bench()
    config = bench._config(tiny=tiny)
    n_params, counted = _counted_flops_per_token(config, device, batch, seq)
    formula = bench.flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, seq)
    # The formula counts biases and norms as matmul weights (a fraction of a percent too many).
    assert formula == pytest.approx(counted, rel=0.01)


def test_the_benchmark_config_is_qwen2_0_5b():
    import torch
    from transformers import AutoModelForCausalLM

    config = _bench()._config(tiny=False)
    with torch.device("meta"):
        n_params = AutoModelForCausalLM.from_config(config).num_parameters()
    # Qwen2-0.5B's published parameter count (tied embeddings counted once).
    assert n_params == 494_032_768
