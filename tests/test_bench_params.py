"""pyllama bench's command line: llama-bench's value syntax, defaults and test matrix order."""

from __future__ import annotations

import pytest

from pyllama.benchmark.params import (
    FLASH_ATTN_AUTO,
    FLASH_ATTN_OFF,
    FLASH_ATTN_ON,
    UsageError,
    cpu_get_num_math,
    parse_args,
    parse_int_range,
)
from pyllama.benchmark.record import Record, _cpp_stdev_u64, _stdev_f
from pyllama.benchmark.runner import fit_context, threadpool_kwargs


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("512", [512]),
        ("1,2,4", [1, 2, 4]),
        ("1-4", [1, 2, 3, 4]),
        ("16-64+16", [16, 32, 48, 64]),
        ("1-16*2", [1, 2, 4, 8, 16]),
        ("1-3,8", [1, 2, 3, 8]),
        ("", []),
    ],
)
def test_int_ranges(text: str, values: list[int]) -> None:
    assert parse_int_range(text) == values


@pytest.mark.parametrize("text", ["a", "1-", "4-8*1", "-1", "1,,2"])
def test_bad_int_ranges(text: str) -> None:
    with pytest.raises(UsageError):
        parse_int_range(text)


def test_negative_gpu_layers_allowed_only_for_ngl() -> None:
    assert parse_args(["-ngl", "-1"]).n_gpu_layers == [-1]
    with pytest.raises(UsageError):
        parse_args(["-t", "-1"])


def test_defaults_are_llama_bench_defaults() -> None:
    p = parse_args([])
    assert p.model == ["models/7B/ggml-model-q4_0.gguf"]
    assert (p.n_prompt, p.n_gen, p.n_pg, p.n_depth) == ([512], [128], [], [0])
    assert (p.n_batch, p.n_ubatch, p.type_k, p.type_v) == ([2048], [512], ["f16"], ["f16"])
    assert p.n_threads == [cpu_get_num_math()]
    assert (p.n_gpu_layers, p.flash_attn, p.reps, p.output_format) == ([-1], [FLASH_ATTN_AUTO], 5, "md")
    assert [i.name for i in p.instances()] == ["pp512", "tg128"]


def test_lists_repeat_and_accumulate() -> None:
    p = parse_args(["-t", "1", "-t", "2,4", "-fa", "on,off,auto", "--n_prompt", "8"])
    assert p.n_threads == [1, 2, 4]
    assert p.flash_attn == [FLASH_ATTN_ON, FLASH_ATTN_OFF, FLASH_ATTN_AUTO]
    assert p.n_prompt == [8]  # "--n_prompt": underscores read as dashes, as llama-bench does


def test_matrix_order_is_llama_benchs() -> None:
    # threads vary outside depth; within one combination: every -p, then every -n, then every -pg
    p = parse_args(["-p", "8,16", "-n", "4", "-pg", "8,4", "-t", "1,2", "-d", "0,32"])
    got = [(i.n_threads, i.name) for i in p.instances()]
    assert got[:8] == [
        (1, "pp8"), (1, "pp16"), (1, "tg4"), (1, "pp8+tg4"),
        (1, "pp8 @ d32"), (1, "pp16 @ d32"), (1, "tg4 @ d32"), (1, "pp8+tg4 @ d32"),
    ]
    assert len(got) == 16 and got[8] == (2, "pp8")


def test_zero_sizes_are_skipped() -> None:
    assert [i.name for i in parse_args(["-p", "0", "-n", "16"]).instances()] == ["tg16"]


def test_native_args_select_one_test() -> None:
    p = parse_args(["-p", "0", "-n", "0", "-pg", "512,128", "-d", "4096", "-fa", "on", "-ts", "3/1"])
    (inst,) = p.instances()
    args = inst.native_args()
    assert args[args.index("-pg") + 1] == "512,128"
    assert args[args.index("-p") + 1] == "0" and args[args.index("-n") + 1] == "0"
    assert args[args.index("-d") + 1] == "4096" and args[args.index("-fa") + 1] == "on"
    assert args[args.index("-ts") + 1] == "3/1"


@pytest.mark.parametrize("argv", [["-ot", "x=CPU"], ["-ncmoe", "2"], ["-lm", "dio"], ["-r", "0"], ["--bogus"],
                                  ["-fa", "maybe"], ["-ctk", "q2_k"], ["-o", "xml"], ["-C", "0xg"], ["-C", "0X1"],
                                  ["-C", "0x" + "f" * 129], ["--poll", "101"], ["--poll", "-1"], ["--prio", "4"],
                                  ["--prio", "-2"], ["--prio", "high"], ["--cpu-strict", "2"], ["-fitt", "-1"],
                                  ["-fitc", "x"]])
def test_refused(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_threadpool_options_make_the_matrix() -> None:
    # llama-bench's nesting: threads, then cpu mask, then cpu-strict, then depth, then poll
    p = parse_args(["-p", "8", "-n", "0", "-C", "0x1,0x3", "--cpu-strict", "0,1", "--poll", "0-100+50",
                    "--prio", "1"])
    assert (p.cpu_mask, p.cpu_strict, p.poll, p.prio) == (["0x1", "0x3"], [False, True], [0, 50, 100], 1)
    got = [(i.cpu_mask, i.cpu_strict, i.poll) for i in p.instances()]
    assert len(got) == 12 and got[:4] == [("0x1", False, 0), ("0x1", False, 50), ("0x1", False, 100),
                                          ("0x1", True, 0)]
    assert {i.prio for i in p.instances()} == {1}
    inst = p.instances()[-1]
    assert threadpool_kwargs(inst) == {"n_threads": inst.n_threads, "cpu_mask": "0x3", "strict_cpu": True,
                                       "poll": 100, "prio": 1}
    args = inst.native_args()
    assert args[args.index("-C") + 1] == "0x3" and args[args.index("--cpu-strict") + 1] == "1"
    assert args[args.index("--poll") + 1] == "100" and args[args.index("--prio") + 1] == "1"
    assert "--prio" not in parse_args([]).instances()[0].native_args()  # the default is llama-bench's


def test_threadpool_options_are_columns_when_not_default() -> None:
    import io

    from pyllama.benchmark.record import make_printer

    p = parse_args(["-C", "0x1", "--poll", "0,50"])
    assert p.differs_from_default("cpu_mask") and p.differs_from_default("poll")
    assert not p.differs_from_default("cpu_strict")
    out = io.StringIO()
    printer = make_printer("md", out, p)
    assert printer is not None
    printer.header()
    assert "cpu_mask" in out.getvalue() and "poll" in out.getvalue() and "cpu_strict" not in out.getvalue()


def test_statistics_follow_llama_bench() -> None:
    inst = parse_args(["-p", "100", "-n", "0"]).instances()[0]
    rec = Record(inst=inst, build_commit="x", build_number=0, cpu_info="", gpu_info="", backends="CPU",
                 model_type="", model_size=0, model_n_params=0, test_time="", samples_ns=[1_000_000, 2_000_000])
    assert rec.avg_ns == 1_500_000
    assert rec.samples_ts == [100_000.0, 50_000.0]
    assert rec.avg_ts == 75_000.0
    assert rec.stddev_ns == _cpp_stdev_u64([1_000_000, 2_000_000]) == 707106
    assert rec.stddev_ts == pytest.approx(_stdev_f([100_000.0, 50_000.0]))
    assert rec.tensor_split_str() == "0.00"
    vals = dict(zip(rec.typed_values(), rec.string_values()))
    assert vals["avg_ts"] == "75000.000000" and vals["cpu_strict"] == "0" and vals["repack"] == "1"


def test_fit_options_make_the_matrix_and_reach_llama_cpp() -> None:
    # llama-bench nests the fit options right under the model, so a model is fitted once per pair
    p = parse_args(["-p", "64", "-n", "8", "-d", "16", "-fitt", "512,1024", "-fitc", "256", "-ctk", "q8_0"])
    got = [(i.fit_target, i.fit_min_ctx, i.n_prompt, i.n_gen) for i in p.instances()]
    assert got == [(512, 256, 64, 0), (512, 256, 0, 8), (1024, 256, 64, 0), (1024, 256, 0, 8)]
    inst = p.instances()[0]
    assert inst.fits and not parse_args([]).instances()[0].fits
    assert inst.model_key() != p.instances()[2].model_key()  # another margin: another model load
    args = inst.native_args()
    assert args[args.index("-fitt") + 1] == "512" and args[args.index("-fitc") + 1] == "256"
    assert "-fitt" not in parse_args([]).instances()[0].native_args()
    # the context llama-bench fits for: prompt + generation + depth cells, the test's KV types
    ctx = fit_context(inst)
    assert ctx["n_ctx"] == 64 + 16 and ctx["type_k"] == "q8_0" and ctx["swa_full"] is False
