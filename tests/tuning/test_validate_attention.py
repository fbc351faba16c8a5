"""``tune --validate`` also checks ``attention.json``: every stored attention choice parses and its
kernel builds for the database's arch (CPU only: CUDA builds, nothing runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuning.targets import make_target
from tuning.validate import ValidationReport, validate_attention

COMMITTED = Path(__file__).resolve().parents[2] / "databases" / "sm_90" / "gpt2-q0f16"


def test_the_committed_attention_choices_build_for_sm90():
    doc = json.loads((COMMITTED / "attention.json").read_text())
    kernels = sorted(e["kernel"] for e in doc["kernels"])
    assert kernels == ["batch_decode_paged_kv", "batch_prefill_ragged_kv"]
    n, built, failures = validate_attention(COMMITTED, target=make_target("sm_90"))
    assert (n, built, failures) == (2, 2, [])


def test_a_stored_choice_that_cannot_be_built_is_a_failure_and_nothing_is_written(tmp_path):
    doc = json.loads((COMMITTED / "attention.json").read_text())
    decode = next(e for e in doc["kernels"] if e["kernel"] == "batch_decode_paged_kv")
    decode["best"]["config"] = {"groups": 3, "tokens": 4}  # 3 token groups: not a power of two
    (tmp_path / "attention.json").write_text(json.dumps(doc))
    before = (tmp_path / "attention.json").read_bytes()
    n, built, failures = validate_attention(tmp_path, target=make_target("sm_90"), build=False)
    assert (n, built) == (2, 1) and len(failures) == 1
    assert "batch_decode_paged_kv" in failures[0], failures
    assert (tmp_path / "attention.json").read_bytes() == before
    report = ValidationReport(records=0, replayed=0, built=0, failures=failures, attention=n, attention_built=built)
    assert not report.ok() and "attention.json: 1 of 2 built" in report.line()


def test_an_unparsable_file_is_one_failure_and_cpu_targets_skip_it(tmp_path):
    (tmp_path / "attention.json").write_text("{not json")
    n, built, failures = validate_attention(tmp_path, target=make_target("sm_90"))
    assert (n, built) == (1, 0) and len(failures) == 1 and "not a valid attention tuning file" in failures[0]
    shutil.copy(COMMITTED / "attention.json", tmp_path / "attention.json")
    assert validate_attention(tmp_path, target=make_target("cpu")) == (0, 0, [])
