"""python -m emoe_jax.generate end to end on a tiny checkpoint with a real (tiny) tokenizer."""

import json
import subprocess
import sys

import pytest

from emoe_jax.generate import main


def run_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "emoe_jax.generate", *args], capture_output=True, text=True)


@pytest.fixture
def run(run_main):
    """The CLI in this process (test_streaming_text_and_stats runs the real `python -m` entry point)."""
    return lambda *args: run_main(main, *args)


def test_json_output_and_exactness(run, tiny_ckpt):
    outs = []
    for frac in ("1.0", "0.25", "1"):
        proc = run("--model", str(tiny_ckpt), "--prompt", "hello world", "--prompt", "x",
                   "--max-new-tokens", "8", "--device-experts", frac, "--json")
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    for out in outs:
        assert set(out) == {"text", "tokens", "stats"} and len(out["text"]) == 2
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "device_hit_rate", "device_expert_bytes",
                    "all_expert_bytes", "h2d_bytes", "stall_s", "compiles"):
            assert key in out["stats"], key
    # Exact mode: the same tokens whatever the device budget.
    assert outs[0]["tokens"] == outs[1]["tokens"] == outs[2]["tokens"]
    assert outs[1]["stats"]["device_expert_bytes"] * 4 == outs[0]["stats"]["device_expert_bytes"]


def test_streaming_text_and_stats(tiny_ckpt):
    proc = run_subprocess("--model", str(tiny_ckpt), "--prompt", "abc", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("abc")
    assert "device hit rate" in proc.stderr and "compilations" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "  "], "empty"),
    ([], "at least one --prompt"),
    (["--prompt", "a", "--device-experts", "0"], "device-experts"),
    (["--prompt", "a", "--max-new-tokens", "100000"], "context"),
    (["--prompt", "a", "--policy", "score"], "predictor's scores"),
    (["--prompt", "a", "--eviction-scores", "reuse"], "add --policy score"),
    (["--prompt", "a", "--predictor", "causal-reuse"], "--train-traces"),
    (["--prompt", "a", "--predictor", "recency-reuse"], "only ranks evictions; add --policy score"),
])
def test_bad_input_is_a_clear_error(run, tiny_ckpt, args, needle):
    proc = run("--model", str(tiny_ckpt), *args)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_dir(run, tmp_path):
    proc = run("--model", str(tmp_path / "nope"), "--prompt", "a")
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_incomplete_checkpoint_is_refused(run, tiny_ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "manifest.json").unlink()
    proc = run("--model", str(broken), "--prompt", "a")
    assert proc.returncode != 0 and "incomplete" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_or_missing_expert_chunk_is_named(run, tiny_ckpt, tmp_path):
    import shutil

    from emoe_jax.checkpoint import ExpertIntegrityError
    from emoe_jax.runtime.engine import OffloadedEngine

    for damage in ("flip", "delete"):
        broken = tmp_path / damage
        shutil.copytree(tiny_ckpt, broken)
        chunks = sorted(p for p in (broken / "experts" / "gate").rglob("*") if p.is_file() and p.name != "zarr.json")
        victim = chunks[len(chunks) // 2]
        if damage == "flip":
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
        else:
            victim.unlink()
        engine = OffloadedEngine.from_checkpoint(broken, device_experts=1.0)
        with pytest.raises(ExpertIntegrityError, match=r"MoE layer \d+ expert \d+"):
            # Long enough that every expert gets routed to at least once.
            engine.generate([list(range(3, 200))], 2)
        proc = run("--model", str(broken), "--prompt", "the quick brown fox jumps over 0123456789 " * 3, "--max-new-tokens", "2",
                   "--device-experts", "1.0")
        assert proc.returncode != 0 and "expert" in proc.stderr and "Traceback" not in proc.stderr


def test_runs_from_the_tensorstore_disk_tier_with_a_small_host_budget(tiny_ckpt):
    from emoe_jax.runtime.engine import OffloadedEngine

    full = OffloadedEngine.from_checkpoint(tiny_ckpt, device_experts=1.0)
    ref = full.generate([[5, 6, 7, 8, 9]], 6, stop_at_eos=False).tokens
    engine = OffloadedEngine.from_checkpoint(tiny_ckpt, device_experts=2, host_experts=3)
    store = engine.source
    store.reset_counters()
    out = engine.generate([[5, 6, 7, 8, 9]], 6, stop_at_eos=False)
    assert out.tokens == ref
    assert store.reads == out.stats["host"]["misses"] > 3  # more reads than the host tier can hold
    assert out.stats["disk_to_host_bytes"] == store.bytes_read


def test_decode_path_flag_and_stats(run, tiny_ckpt):
    outs = {}
    for path in ("auto", "staged"):
        proc = run("--model", str(tiny_ckpt), "--prompt", "hello world", "--max-new-tokens", "6",
                   "--device-experts", "0.25", "--decode-path", path, "--json")
        assert proc.returncode == 0, proc.stderr
        outs[path] = json.loads(proc.stdout)
    assert outs["auto"]["stats"]["decode_path"] == "onejit" and outs["auto"]["stats"]["decode_path_reason"] is None
    assert outs["staged"]["stats"]["decode_path"] == "staged"
    assert outs["auto"]["tokens"] == outs["staged"]["tokens"]
    proc = run("--model", str(tiny_ckpt), "--prompt", "a", "--host-experts", "3", "--decode-path", "onejit")
    assert proc.returncode == 2 and "onejit" in proc.stderr and "host tier" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--model", str(tiny_ckpt), "--prompt", "a", "--max-new-tokens", "3", "--host-experts", "3")
    assert proc.returncode == 0 and "decode path: staged (the host tier" in proc.stderr


def test_predictor_list_says_where_each_runs():
    from emoe_jax.generate import runnable_predictors

    listing = runnable_predictors()
    assert listing["recency-reuse"].startswith("[in-graph]") and "--policy score" in listing["recency-reuse"]
    assert listing["spec-gating"].startswith("[in-graph]")
    assert listing["causal-reuse"].startswith("[host thread, staged path]")
