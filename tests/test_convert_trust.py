"""Conversion knows its source by content, one conversion per folder, and missing tokenizers are said.

Issue 13: a different model of the same shape converted into a finished folder used to
print `already complete` (keeping the old weights), and a resume after the source
changed mixed two models; both are refused now, naming the file that differs.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("torch")
from test_convert import _assert_clean_error, _cli, make_hf  # noqa: E402

from emoe_jax.convert import main as convert_main  # noqa: E402

from emoe_jax.checkpoint import CheckpointError, convert_hf_checkpoint, load_checkpoint  # noqa: E402
from emoe_jax.checkpoint.lock import ConversionLockedError, conversion_lock  # noqa: E402


def test_same_shape_other_model_is_not_already_complete(tmp_path):
    a, _ = make_hf(tmp_path, "mixtral", seed=0)
    b, _ = make_hf(tmp_path, "mixtral", seed=1)  # same names, shapes, sizes; other weights
    assert [p.stat().st_size for p in sorted(a.iterdir())] == [p.stat().st_size for p in sorted(b.iterdir())]
    out = tmp_path / "out"
    convert_hf_checkpoint(a, out, progress=False)
    again = convert_hf_checkpoint(a, out, progress=False)
    assert again["status"] == "already complete"
    with pytest.raises(CheckpointError, match=r"another source.*model.safetensors changed \(content\).*--overwrite"):
        convert_hf_checkpoint(b, out, progress=False)
    assert load_checkpoint(out).manifest["source"]["fingerprint"]["source"]["files"][0]["sha256_sampled"]


def test_resume_after_the_source_changed_is_refused(run_main, tmp_path):
    a, _ = make_hf(tmp_path, "mixtral", shard="20KB", seed=0)
    b, _ = make_hf(tmp_path, "mixtral", shard="20KB", seed=1)
    out = tmp_path / "out"
    assert _cli(a, out, env={"EMOE_JAX_CONVERT_CRASH_AFTER": "3"}).returncode == 86
    # Swap one shard's content under the same name and size: the resume must not mix them.
    victim = sorted(a.glob("model-*.safetensors"))[-1]
    shutil.copyfile(b / victim.name, victim)
    _assert_clean_error(run_main(convert_main, a, out, "--no-progress"), "partial conversion",
                        f"{victim.name} changed (content)", "--overwrite")
    proc = run_main(convert_main, a, out, "--overwrite", "--json", "--no-progress")
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "completed", proc.stderr


def test_second_conversion_into_a_locked_folder_names_the_holder(tmp_path):
    hf, _ = make_hf(tmp_path, "olmoe")
    out = tmp_path / "out"
    with conversion_lock(out):  # flock is per open file: a second open in this process conflicts too
        with pytest.raises(ConversionLockedError, match=f"being written by another conversion .pid {os.getpid()}"):
            convert_hf_checkpoint(hf, out, progress=False)
    assert convert_hf_checkpoint(hf, out, progress=False)["status"] == "completed"  # released


def test_missing_tokenizer_warns_at_conversion(run_main, tmp_path):
    hf, _ = make_hf(tmp_path, "olmoe")
    assert not (hf / "tokenizer.json").exists()
    proc = run_main(convert_main, hf, tmp_path / "out", "--no-progress")
    assert proc.returncode == 0 and "warning" in proc.stderr and "no tokenizer" in proc.stderr, proc.stderr
    (hf / "tokenizer.json").write_text("{}")
    summary = convert_hf_checkpoint(hf, tmp_path / "out2", progress=False)
    assert summary["warnings"] == [] and "tokenizer.json" in summary["tokenizer_files"]
