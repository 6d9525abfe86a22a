"""python -m emoe_jax.bench runtime: fused baseline + offloaded rows, with and without a prefetching predictor."""

import json

from emoe_jax.bench.runtime import main


def test_runtime_bench_with_prefetch(capsys):
    assert main(["--models", "tiny", "--fractions", "0.5", "--repeats", "1", "--new-tokens", "6",
                 "--prompt-len", "8", "--predictor", "prev-token", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["models"][0]
    fused, offloaded = result["rows"]
    assert fused["config"] == "fused all-resident" and fused["ratio_vs_fused"] == 1.0
    assert offloaded["config"] == "offloaded S/E=0.5 + prev-token prefetch"
    assert offloaded["decode_tokens_per_s"] > 0 and 0 <= offloaded["device_hit_rate"] <= 1
    assert offloaded["compiles_after_warmup"] == 0


def test_runtime_bench_errors(capsys):
    assert main(["--models", "nope"]) == 2
    assert main(["--models", "tiny", "--predictor", "static-freq"]) == 2
    assert "--train-traces" in capsys.readouterr().err
