"""python -m emoe_jax.bench runtime: fused baseline, staged, onejit and onejit+predictor rows."""

import json

from emoe_jax.bench.runtime import main


def test_runtime_bench_rows(capsys):
    assert main(["--models", "tiny", "--fractions", "0.5", "--repeats", "1", "--new-tokens", "6",
                 "--prompt-len", "8", "--in-graph", "spec-gating,learned", "--predictor", "prev-token",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"fused", "staged", "onejit", "onejit+spec-gating", "staged+prev-token"}
    assert rows["fused"]["ratio_to_fused"] == 1.0
    assert result["models"][0]["skipped"] == ["onejit+learned: no learned checkpoint for this model's shape"]
    for label, row in rows.items():
        assert row["model"] == "tiny" and row["decode_tokens_per_s"] > 0 and 0 <= row["device_hit_rate"] <= 1
        if label != "fused":
            assert row["fraction"] == 0.5 and row["compiles_after_warmup"] == 0
            assert row["decode_path"] == label.split("+")[0]
    assert rows["onejit+spec-gating"]["prefetch"]["in_graph"]
    assert not rows["staged+prev-token"]["prefetch"]["in_graph"]


def test_runtime_bench_errors(capsys):
    assert main(["--models", "nope"]) == 2
    assert main(["--models", "tiny", "--predictor", "static-freq"]) == 2
    assert "--train-traces" in capsys.readouterr().err
    assert main(["--models", "tiny", "--in-graph", "static-freq"]) == 2
