"""pyllama bench tune: the settings sweep runs and prints usable flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyllama.benchmark import main, parse_args
from pyllama.benchmark.params import FLASH_ATTN_OFF, FLASH_ATTN_ON
from pyllama.benchmark.tune import tune


def test_tune_finds_a_setting(synth_model_path: Path) -> None:
    logged: list[str] = []
    best, res = tune(str(synth_model_path), threads=[1], batches=[16, 64], ubatches=[16, 64],
                     flash=[FLASH_ATTN_ON, FLASH_ATTN_OFF], kv=[("f16", "f16")], n_prompt=32, n_gen=4, reps=1,
                     passes=1, log=logged.append)
    assert res["pp"] > 0 and res["tg"] > 0
    assert best.threads_pp == best.threads_tg == 1
    assert best.flash_attn in (FLASH_ATTN_ON, FLASH_ATTN_OFF)
    assert best.n_ubatch <= best.n_batch and best.n_batch in (16, 64)
    assert any("pp32" in line for line in logged) and any("tg4" in line for line in logged)
    # the printed flags are valid llama-bench / pyllama bench flags
    (inst,) = parse_args(["-p", "0", "-n", "4", *best.bench_flags("tg").split()]).instances()
    assert inst.n_threads == 1


def test_tune_cli(synth_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["tune", "-m", str(synth_model_path), "-p", "16", "-n", "2", "-r", "1", "-t", "1", "-b", "16",
               "-ub", "16", "-fa", "on", "--kv", "f16", "--passes", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "fastest prompt processing (pp16)" in out and "fastest generation        (tg2)" in out
    assert "model.context(n_threads=1, n_threads_batch=1, n_batch=16, n_ubatch=16, flash_attn='on'" in out


def test_unfit_settings_are_skipped_not_fatal(synth_model_path: Path) -> None:
    # the synthetic model's head size (16) does not fit q8_0 blocks: the candidate fails and loses
    best, res = tune(str(synth_model_path), threads=[1], batches=[32], ubatches=[32], flash=[FLASH_ATTN_ON],
                     kv=[("q8_0", "q8_0"), ("f16", "f16")], n_prompt=16, n_gen=2, reps=1, passes=1,
                     log=lambda s: None)
    assert best.type_k == "f16" and res["pp"] > 0
