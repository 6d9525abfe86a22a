"""python -m emoe_jax.bench device-check --small: every section reports, the fetched slots match NumPy."""

import json

from emoe_jax.bench.device_check import DECODE_CONFIGS, FETCH_FORMS, default_sizes, main


def test_device_check_small_json(capsys):
    # A budget no load can exhaust: every row must report (the default skips rows on a slow machine).
    rc = main(["--small", "--json", "--decode-budget-s", "100000"])
    result = json.loads(capsys.readouterr().out)
    assert result["failures"] == [] and rc == 0
    meta = result["meta"]
    assert {"backend", "device_kind", "jax", "memory_kinds", "memory_stats"} <= set(meta)
    assert "pinned_host" in meta["memory_kinds"]

    fetch = result["fetch"]
    assert fetch["correct"] is True and fetch["expert_bytes"] > 0
    for row in fetch["rows"]:
        for form in FETCH_FORMS:
            assert row[form]["correct"] is True and row[form]["gbps"] > 0
        for baseline in ("ingraph_slice", "device_put_pinned", "device_put_numpy"):
            assert row[baseline]["gbps"] > 0

    overlap = result["overlap"]
    for key in ("t_a_fetch_s", "t_b_compute_s", "t_c_both_s"):
        assert overlap[key] > 0
    assert isinstance(overlap["overlap"], float)

    rows = result["decode"]["rows"]
    fractions = default_sizes(small=True).fractions
    assert {(r["fraction"], r["config"]) for r in rows} == {(f, c) for f in fractions for c in DECODE_CONFIGS}
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and 0 <= r["device_hit_rate"] <= 1, r
        assert r["decode_path"] == ("fused" if r["config"] == "fused" else
                                    "staged" if r["config"] == "staged" else "onejit")
    spec = [r for r in rows if r["config"] == "onejit+spec-gating"]
    assert all(r["prefetch"]["in_graph"] for r in spec)


def test_device_check_errors(capsys):
    assert main(["--sections", "nope"]) == 2
    assert main(["--fractions", "a,b"]) == 2
    assert "comma-separated" in capsys.readouterr().err
