"""llama-bench's command line: the same options, the same value syntax, the same test matrix.

Mirrors ``parse_cmd_params`` and ``get_cmd_params_instances`` of the vendored
``tools/llama-bench/llama-bench.cpp``: every test parameter takes a comma list
(or is repeated), integer parameters also take ranges ``first-last``,
``first-last+step`` and ``first-last*mult``, and the matrix is enumerated in
llama-bench's order (so a model is reloaded as rarely as possible).

``-C``, ``--cpu-strict``, ``--poll`` and ``--prio`` configure a
:class:`pyllama.Threadpool` per test, as llama-bench does. Options that need
llama.cpp internals pyllama does not expose (tensor overrides, NUMA,
MoE weights on the CPU, ...) accept only llama-bench's default, so a record
never claims a setting that was not applied.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, TypeVar

from ..threadpool import PRIORITIES, parse_cpu_mask

T = TypeVar("T")

OUTPUT_FORMATS = ("none", "csv", "json", "jsonl", "md", "sql")
SPLIT_MODES = ("none", "layer", "row", "tensor")
LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")
LAZY_MODES = ("off", "auto", "on")
# llama-bench's ggml_type_from_name: the KV cache types it accepts
CACHE_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
# llama_flash_attn_type: what the JSON "flash_attn" integer means
FLASH_ATTN_AUTO, FLASH_ATTN_OFF, FLASH_ATTN_ON = -1, 0, 1
FLASH_ATTN_NAMES = {FLASH_ATTN_AUTO: "auto", FLASH_ATTN_OFF: "off", FLASH_ATTN_ON: "on"}
LLAMA_MAX_DEVICES = 16  # llama_max_devices(): the length of tensor_split


class UsageError(ValueError):
    """A command line llama-bench would reject (or one pyllama cannot honour)."""


def cpu_get_num_math() -> int:
    """llama.cpp's default thread count (``common_cpu_get_num_math``): physical cores.

    On Linux the number of distinct ``thread_siblings`` sets (one per core);
    elsewhere half the logical CPUs above four, as llama.cpp's fallback does.
    Hybrid Intel CPUs (where llama.cpp also drops efficiency cores) are not
    distinguished; pass ``-t`` explicitly there.
    """
    siblings: set[str] = set()
    cpu = 0
    while True:
        p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings")
        try:
            siblings.add(p.read_text().strip())
        except OSError:
            break
        cpu += 1
    if siblings:
        return len(siblings)
    n = os.cpu_count() or 4
    return n if n <= 4 else n // 2


@dataclass(frozen=True)
class Instance:
    """One test of the matrix (llama-bench's ``cmd_params_instance``)."""

    model: str
    n_prompt: int
    n_gen: int
    n_depth: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    n_threads: int
    cpu_mask: str
    cpu_strict: bool
    poll: int
    n_gpu_layers: int
    n_cpu_moe: int
    split_mode: str
    load_mode: str
    lazy_mode: str
    main_gpu: int
    no_kv_offload: bool
    flash_attn: int
    devices: str  # "auto", "none" or "DEV0/DEV1"
    tensor_split: tuple[float, ...]
    tensor_buft_overrides: str  # "none" (the only value pyllama runs)
    embeddings: bool
    no_op_offload: bool
    no_host: bool
    repack: bool
    fit_target: int
    fit_min_ctx: int
    prio: int = 0  # --prio: one value for the whole run, not a record field (as in llama-bench)
    rpc: str = ""  # -rpc: RPC servers added for the whole run, not a record field (as in llama-bench)
    # --sampling: a generation test that samples each token and feeds it back ("host", "argmax",
    # "backend"); "" is llama-bench's tg (random tokens, no sampling)
    sampling: str = ""

    @property
    def name(self) -> str:
        """llama-bench's test label: ``pp512``, ``tg128``, ``pp512+tg128``, with `` @ d4096``."""
        if self.n_prompt > 0 and self.n_gen == 0:
            s = f"pp{self.n_prompt}"
        elif self.n_gen > 0 and self.n_prompt == 0:
            s = f"tg{self.n_gen}"
        else:
            s = f"pp{self.n_prompt}+tg{self.n_gen}"
        if self.sampling:
            s += f" {self.sampling}"
        return s + (f" @ d{self.n_depth}" if self.n_depth > 0 else "")

    def model_key(self) -> tuple[object, ...]:
        """What ``equal_mparams`` compares: equal keys share one loaded model."""
        return (self.model, self.n_gpu_layers, self.n_cpu_moe, self.split_mode, self.main_gpu, self.tensor_split,
                self.load_mode, self.lazy_mode, self.devices, self.no_host, self.repack, self.tensor_buft_overrides,
                self.fit_target, self.fit_min_ctx)

    @property
    def fits(self) -> bool:
        """llama-bench's ``do_fit``: either fit option differs from its default (0)."""
        return self.fit_target != 0 or self.fit_min_ctx != 0

    def native_args(self) -> list[str]:
        """llama-bench arguments that select exactly this one test."""
        if self.n_prompt > 0 and self.n_gen > 0:
            shape = ["-p", "0", "-n", "0", "-pg", f"{self.n_prompt},{self.n_gen}"]
        else:
            shape = ["-p", str(self.n_prompt), "-n", str(self.n_gen)]
        args = [
            "-m", self.model, *shape, "-d", str(self.n_depth), "-b", str(self.n_batch), "-ub", str(self.n_ubatch),
            "-ctk", self.type_k, "-ctv", self.type_v, "-t", str(self.n_threads), "-C", self.cpu_mask,
            "--cpu-strict", str(int(self.cpu_strict)), "--poll", str(self.poll), "-ngl", str(self.n_gpu_layers),
            "-sm", self.split_mode, "-mg", str(self.main_gpu), "-nkvo", str(int(self.no_kv_offload)),
            "-fa", FLASH_ATTN_NAMES[self.flash_attn], "-lm", self.load_mode, "-lzm", self.lazy_mode,
            "-embd", str(int(self.embeddings)), "-nopo", str(int(self.no_op_offload)),
            "--no-host", str(int(self.no_host)), "--repack", str(int(self.repack)),
        ]
        if self.n_cpu_moe:
            args += ["-ncmoe", str(self.n_cpu_moe)]
        if self.fits:
            args += ["-fitt", str(self.fit_target), "-fitc", str(self.fit_min_ctx)]
        if self.prio:
            args += ["--prio", str(self.prio)]
        if self.rpc:
            args += ["-rpc", self.rpc]
        if self.devices != "auto":
            args += ["-dev", self.devices]
        if any(self.tensor_split):
            last = max(i for i, v in enumerate(self.tensor_split) if v > 0)
            args += ["-ts", "/".join(f"{v:g}" for v in self.tensor_split[: last + 1])]
        return args


@dataclass
class Params:
    """The parsed command line (llama-bench's ``cmd_params``) plus pyllama's own options."""

    model: list[str] = field(default_factory=list)
    n_prompt: list[int] = field(default_factory=list)
    n_gen: list[int] = field(default_factory=list)
    n_pg: list[tuple[int, int]] = field(default_factory=list)
    n_depth: list[int] = field(default_factory=list)
    n_batch: list[int] = field(default_factory=list)
    n_ubatch: list[int] = field(default_factory=list)
    type_k: list[str] = field(default_factory=list)
    type_v: list[str] = field(default_factory=list)
    n_threads: list[int] = field(default_factory=list)
    cpu_mask: list[str] = field(default_factory=list)
    cpu_strict: list[bool] = field(default_factory=list)
    poll: list[int] = field(default_factory=list)
    n_gpu_layers: list[int] = field(default_factory=list)
    n_cpu_moe: list[int] = field(default_factory=list)
    split_mode: list[str] = field(default_factory=list)
    load_mode: list[str] = field(default_factory=list)
    lazy_mode: list[str] = field(default_factory=list)
    main_gpu: list[int] = field(default_factory=list)
    no_kv_offload: list[bool] = field(default_factory=list)
    flash_attn: list[int] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    tensor_split: list[tuple[float, ...]] = field(default_factory=list)
    embeddings: list[bool] = field(default_factory=list)
    no_op_offload: list[bool] = field(default_factory=list)
    no_host: list[bool] = field(default_factory=list)
    repack: list[bool] = field(default_factory=list)
    fit_target: list[int] = field(default_factory=list)  # MiB to leave free per device; 0: no fitting
    fit_min_ctx: list[int] = field(default_factory=list)
    reps: int = 5
    prio: int = 0  # ggml_sched_priority: -1 low, 0 normal, 1 medium, 2 high, 3 realtime
    rpc: str = ""  # -rpc host:port,...: RPC servers whose devices join the run (llama-bench registers them once)
    delay: int = 0
    verbose: bool = False
    progress: bool = False
    no_warmup: bool = False
    output_format: str = "md"
    output_format_stderr: str = "none"
    # pyllama's own options
    native: bool = False
    native_bin: str | None = None
    interleave: str = "rep"
    sampling: list[str] = field(default_factory=list)  # [] : llama-bench's tg only
    label: str | None = None
    save: str | None = None
    seed: int = 0
    list_devices: bool = False
    version: bool = False
    help: bool = False

    def instances(self) -> list[Instance]:
        """The test matrix, in llama-bench's nesting order."""
        out: list[Instance] = []
        for m, fpt, fpc in ((m, t, c) for m in self.model for t in self.fit_target for c in self.fit_min_ctx):
            for nl in self.n_gpu_layers:
                for ncmoe in self.n_cpu_moe:
                    for sm in self.split_mode:
                        for lm in self.load_mode:
                            for lzm in self.lazy_mode:
                                for mg in self.main_gpu:
                                    for devs in self.devices:
                                        for ts in self.tensor_split:
                                            for noh in self.no_host:
                                                for rpk in self.repack:
                                                    for embd in self.embeddings:
                                                        for nopo in self.no_op_offload:
                                                            out += [replace(i, fit_target=fpt, fit_min_ctx=fpc)
                                                                    for i in self._inner(m, nl, ncmoe, sm, lm, lzm, mg,
                                                                                         devs, ts, noh, rpk, embd,
                                                                                         nopo)]
        return out

    def _inner(self, m: str, nl: int, ncmoe: int, sm: str, lm: str, lzm: str, mg: int, devs: str,
               ts: tuple[float, ...], noh: bool, rpk: bool, embd: bool, nopo: bool) -> list[Instance]:
        out: list[Instance] = []
        for nb in self.n_batch:
            for nub in self.n_ubatch:
                for tk in self.type_k:
                    for tv in self.type_v:
                        for nkvo in self.no_kv_offload:
                            for fa in self.flash_attn:
                                for nt in self.n_threads:
                                    for cm in self.cpu_mask:
                                        for cs in self.cpu_strict:
                                            for nd in self.n_depth:
                                                for pl in self.poll:
                                                    base = Instance(
                                                        model=m, n_prompt=0, n_gen=0, n_depth=nd, n_batch=nb,
                                                        n_ubatch=nub, type_k=tk, type_v=tv, n_threads=nt,
                                                        cpu_mask=cm, cpu_strict=cs, poll=pl, n_gpu_layers=nl,
                                                        n_cpu_moe=ncmoe, split_mode=sm, load_mode=lm, lazy_mode=lzm,
                                                        main_gpu=mg, no_kv_offload=nkvo, flash_attn=fa,
                                                        devices=devs, tensor_split=ts, tensor_buft_overrides="none",
                                                        embeddings=embd, no_op_offload=nopo, no_host=noh,
                                                        repack=rpk, fit_target=0, fit_min_ctx=0,
                                                        prio=self.prio, rpc=self.rpc)
                                                    out += [replace(base, n_prompt=p) for p in self.n_prompt if p]
                                                    out += [replace(base, n_gen=g, sampling=sm)
                                                            for g in self.n_gen if g
                                                            for sm in (self.sampling or [""])]
                                                    out += [replace(base, n_prompt=p, n_gen=g)
                                                            for p, g in self.n_pg if p or g]
        return out

    def differs_from_default(self, name: str) -> bool:
        """llama-bench's markdown rule: a column appears when a list has several values or a non-default one."""
        value = getattr(self, name)
        return len(value) > 1 or value != getattr(defaults(), name)


def defaults() -> Params:
    """llama-bench's ``cmd_params_defaults``."""
    return Params(
        model=["models/7B/ggml-model-q4_0.gguf"], n_prompt=[512], n_gen=[128], n_pg=[], n_depth=[0],
        n_batch=[2048], n_ubatch=[512], type_k=["f16"], type_v=["f16"], n_threads=[cpu_get_num_math()],
        cpu_mask=["0x0"], cpu_strict=[False], poll=[50], n_gpu_layers=[-1], n_cpu_moe=[0], split_mode=["layer"],
        load_mode=["auto"], lazy_mode=["auto"], main_gpu=[0], no_kv_offload=[False], flash_attn=[FLASH_ATTN_AUTO],
        devices=["auto"], tensor_split=[(0.0,) * LLAMA_MAX_DEVICES], embeddings=[False], no_op_offload=[False],
        no_host=[False], repack=[True], fit_target=[0], fit_min_ctx=[0],
    )


# --- value parsers (llama-bench's syntax) ------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?:([\+|\*])(\d+))?)?(?:,|$)")
_RANGE_NEG = re.compile(r"^(-?\d+)(?:-(\d+)(?:([\+|\*])(\d+))?)?(?:,|$)")


def parse_int_range(s: str, allow_negative: bool = False) -> list[int]:
    """``first[-last[(+|*)step]]`` items separated by commas (llama-bench's parse_int_range)."""
    rx = _RANGE_NEG if allow_negative else _RANGE
    out: list[int] = []
    rest = s
    while rest:
        m = rx.match(rest)
        if not m:
            raise UsageError("invalid range format")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        op = m.group(3) or "+"
        step = int(m.group(4)) if m.group(4) is not None else 1
        i = first
        while i <= last:
            out.append(i)
            prev = i
            if op == "+":
                i += step
            elif op == "*":
                i *= step
            else:
                raise UsageError("invalid range format")
            if i <= prev:
                raise UsageError("invalid range")
        rest = rest[m.end():]
    return out


def _split(s: str, conv: Callable[[str], T]) -> list[T]:
    return [conv(tok) for tok in s.split(",")]


def _non_negative(s: str) -> int:
    v = int(s)
    if v < 0:
        raise UsageError(f'invalid value: "{s}" (must be >= 0)')
    return v


def _bool01(s: str) -> bool:
    # std::istringstream >> bool: "0" or "1"
    if s.strip() in ("0", "1"):
        return s.strip() == "1"
    raise UsageError(f'invalid value: "{s}"')


def _flash_attn(s: str) -> int:
    if s in ("on", "enabled", "true", "1"):
        return FLASH_ATTN_ON
    if s in ("off", "disabled", "false", "0"):
        return FLASH_ATTN_OFF
    if s in ("auto", "-1"):
        return FLASH_ATTN_AUTO
    raise UsageError(f"invalid flash-attn value {s!r}")


def _choice(choices: tuple[str, ...], what: str) -> Callable[[str], str]:
    def conv(s: str) -> str:
        if s not in choices:
            raise UsageError(f"invalid {what} {s!r} (expected one of {', '.join(choices)})")
        return s
    return conv


def _tensor_split(s: str) -> tuple[float, ...]:
    parts = [p for p in re.split(r"[;/]+", s)]
    if len(parts) > LLAMA_MAX_DEVICES:
        raise UsageError(f"tensor split has more than {LLAMA_MAX_DEVICES} entries")
    vals = [float(p) for p in parts]
    return tuple(vals + [0.0] * (LLAMA_MAX_DEVICES - len(vals)))


def _devices(s: str) -> str:
    t = s.strip()
    if not t:
        raise UsageError("no devices specified")
    if t in ("auto", "none"):
        return t
    names = [n.strip() for n in t.split("/")]
    if any(not n for n in names):
        raise UsageError("invalid device specification")
    return "/".join(names)


USAGE = """\
usage: pyllama bench [options]
       pyllama bench tune -m <model> [options]     (fastest settings; `pyllama bench tune -h`)

llama-bench's options and semantics, measured through pyllama's Python API.

options:
  -h, --help
  --version                                   show version and build info
  -r, --repetitions <n>                       number of times to repeat each test (default: 5)
  --prio <-1|0|1|2|3>                         process/thread priority (default: 0)
  --delay <0...N> (seconds)                   delay between each test (default: 0)
  -o, --output <csv|json|jsonl|md|sql>        output format printed to stdout (default: md)
  -oe, --output-err <csv|json|jsonl|md|sql>   output format printed to stderr (default: none)
  --list-devices                              list available devices and exit
  -v, --verbose                               verbose output (llama.cpp's log on stderr)
  --progress                                  print test progress indicators
  --no-warmup                                 skip warmup runs before benchmarking
  -rpc, --rpc <rpc_servers>                   register RPC devices (comma separated)

test parameters:
  -m, --model <filename>                      (default: models/7B/ggml-model-q4_0.gguf)
  -p, --n-prompt <n>                          (default: 512)
  -n, --n-gen <n>                             (default: 128)
  -pg <pp,tg>                                 (default: )
  -d, --n-depth <n>                           (default: 0)
  -b, --batch-size <n>                        (default: 2048)
  -ub, --ubatch-size <n>                      (default: 512)
  -ctk, --cache-type-k <t>                    (default: f16)
  -ctv, --cache-type-v <t>                    (default: f16)
  -t, --threads <n>                           (default: physical cores)
  -C, --cpu-mask <hex,hex>                    (default: 0x0)
  --cpu-strict <0|1>                          (default: 0)
  --poll <0...100>                            (default: 50)
  -ngl, --n-gpu-layers <n>                    (default: -1)
  -ncmoe, --n-cpu-moe <n>                     (only the default, 0)
  -sm, --split-mode <none|layer|row|tensor>   (default: layer)
  -mg, --main-gpu <i>                         (default: 0)
  -nkvo, --no-kv-offload <0|1>                (default: 0)
  -fa, --flash-attn <on|off|auto>             (default: auto)
  -dev, --device <dev0/dev1/...>              (default: auto)
  -lm, --load-mode <auto|none|mmap|mlock|mmap+mlock>  (default: auto)
  -lzm, --lazy-mode <on|auto|off>             (default: auto)
  -embd, --embeddings <0|1>                   (default: 0)
  -ts, --tensor-split <ts0/ts1/..>            (default: 0)
  -nopo, --no-op-offload <0|1>                (default: 0)
  --no-host <0|1>                             (only the default, 0)
  --repack <0|1>                              (default: 1)
  -fitt, --fit-target <MiB>                   fit to device memory leaving this margin per device,
                                              through llama.cpp's own fit (default: off)
  -fitc, --fit-ctx <n>                        minimum context size the fit may choose (default: 0)

pyllama options:
  --native                  run the same matrix with llama.cpp's own llama-bench, interleaved,
                            and report the pyllama/native ratio per test
  --native-bin <path>       the llama-bench executable (default: $PYLLAMA_NATIVE_BENCH, or the
                            checkout's build/native, built by bench/native.py)
  --interleave <rep|test>   alternate pyllama and native every repetition (default) or every test
  --sampling <modes>        tg tests become end-to-end generation: each token is sampled (greedy)
                            and fed back; modes host (llama.cpp's sampler on the CPU), argmax
                            (pyllama's argmax over the logits) and backend (the sampler inside the
                            graph); with --native the reference is llama-simple's loop in C, run
                            in this process on the same context
  --label <name>            machine label stored in every record (default: the host name)
  --save <file.jsonl>       also append every record, as JSON lines, to this file
  --seed <n>                seed of the random tokens (default: 0)

Multiple values can be given for each parameter by separating them with ','
or by specifying the parameter multiple times. Ranges can be given as
'first-last' or 'first-last+step' or 'first-last*mult'.
"""


def parse_args(argv: list[str]) -> Params:
    """Parse a llama-bench command line; raises :class:`UsageError` on a bad one."""
    p = Params()
    i = 0

    def value() -> str:
        nonlocal i
        i += 1
        if i >= len(argv):
            raise UsageError(f"missing value for argument: {argv[i - 1]}")
        return argv[i]

    def ints(s: str) -> list[object]:
        return list(parse_int_range(s))

    def signed_ints(s: str) -> list[object]:  # only -ngl takes negative values
        return list(parse_int_range(s, True))

    def strs(s: str) -> list[object]:
        return list(s.split(","))

    def each(conv: Callable[[str], object]) -> Callable[[str], list[object]]:
        return lambda s: list(_split(s, conv))

    # llama-bench's list options: every spelling, the Params field, the parser of one value list.
    options: list[tuple[tuple[str, ...], str, Callable[[str], list[object]]]] = [
        (("-m", "--model"), "model", strs),
        (("-p", "--n-prompt"), "n_prompt", ints),
        (("-n", "--n-gen"), "n_gen", ints),
        (("-d", "--n-depth"), "n_depth", ints),
        (("-b", "--batch-size"), "n_batch", ints),
        (("-ub", "--ubatch-size"), "n_ubatch", ints),
        (("-ctk", "--cache-type-k"), "type_k", each(_choice(CACHE_TYPES, "cache type"))),
        (("-ctv", "--cache-type-v"), "type_v", each(_choice(CACHE_TYPES, "cache type"))),
        (("-t", "--threads"), "n_threads", ints),
        (("-C", "--cpu-mask"), "cpu_mask", strs),
        (("--cpu-strict",), "cpu_strict", each(_bool01)),
        (("--poll",), "poll", ints),
        (("-ngl", "--n-gpu-layers"), "n_gpu_layers", signed_ints),
        (("-ncmoe", "--n-cpu-moe"), "n_cpu_moe", ints),
        (("-sm", "--split-mode"), "split_mode", each(_choice(SPLIT_MODES, "split mode"))),
        (("-lm", "--load-mode"), "load_mode", each(_choice(LOAD_MODES, "load mode"))),
        (("-lzm", "--lazy-mode"), "lazy_mode", each(_choice(LAZY_MODES, "lazy mode"))),
        (("-nkvo", "--no-kv-offload"), "no_kv_offload", each(_bool01)),
        (("-fa", "--flash-attn"), "flash_attn", each(_flash_attn)),
        (("-dev", "--device"), "devices", each(_devices)),
        (("-ts", "--tensor-split"), "tensor_split", each(_tensor_split)),
        (("-embd", "--embeddings"), "embeddings", each(_bool01)),
        (("-nopo", "--no-op-offload"), "no_op_offload", each(_bool01)),
        (("--no-host",), "no_host", each(_bool01)),
        (("--repack",), "repack", each(_bool01)),
        (("-fitt", "--fit-target"), "fit_target", each(_non_negative)),
        (("-fitc", "--fit-ctx"), "fit_min_ctx", each(_non_negative)),
    ]
    list_opts = {name: (fld, conv) for names, fld, conv in options for name in names}
    unsupported = {"-ot", "--override-tensor", "--numa",
                   "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-hft", "--hf-token"}

    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            arg = arg.replace("_", "-")
        try:
            if arg in ("-h", "--help"):
                p.help = True
            elif arg == "--version":
                p.version = True
            elif arg in list_opts:
                name, conv = list_opts[arg]
                getattr(p, name).extend(conv(value()))
            elif arg == "-mg" or arg == "--main-gpu":
                p.main_gpu = parse_int_range(value())  # llama-bench replaces, not appends
            elif arg == "-pg":
                parts = value().split(",")
                if len(parts) != 2:
                    raise UsageError("-pg takes <pp,tg>")
                p.n_pg.append((int(parts[0]), int(parts[1])))
            elif arg in ("-r", "--repetitions"):
                p.reps = int(value())
            elif arg == "--prio":
                p.prio = int(value())
            elif arg in ("-rpc", "--rpc"):
                p.rpc = value()
                if not p.rpc.strip(", "):
                    raise UsageError("no RPC servers specified")
            elif arg == "--delay":
                p.delay = int(value())
            elif arg in ("-o", "--output"):
                p.output_format = _choice(OUTPUT_FORMATS, "output format")(value())
            elif arg in ("-oe", "--output-err"):
                p.output_format_stderr = _choice(OUTPUT_FORMATS, "output format")(value())
            elif arg in ("-v", "--verbose"):
                p.verbose = True
            elif arg == "--progress":
                p.progress = True
            elif arg == "--no-warmup":
                p.no_warmup = True
            elif arg == "--list-devices":
                p.list_devices = True
            elif arg == "--offline":
                pass  # nothing is ever downloaded
            elif arg == "--native":
                p.native = True
            elif arg == "--native-bin":
                p.native_bin = value()
            elif arg == "--interleave":
                p.interleave = _choice(("rep", "test"), "interleave mode")(value())
            elif arg == "--sampling":
                for mode in value().split(","):
                    p.sampling.append(_choice(("host", "argmax", "backend"), "sampling mode")(mode))
            elif arg == "--label":
                p.label = value()
            elif arg == "--save":
                p.save = value()
            elif arg == "--seed":
                p.seed = int(value())
            elif arg in unsupported:
                raise UsageError(f"{argv[i]} is not supported by pyllama bench")
            else:
                raise UsageError(f"invalid parameter for argument: {argv[i]}")
        except UsageError:
            raise
        except ValueError as exc:
            raise UsageError(f"invalid parameter for argument: {argv[i]} ({exc})") from None
        i += 1

    d = defaults()
    for f in fields(Params):
        if isinstance(getattr(d, f.name), list) and not getattr(p, f.name):
            setattr(p, f.name, list(getattr(d, f.name)))
    _check_supported(p)
    return p


def _check_supported(p: Params) -> None:
    """Refuse settings that pyllama's API cannot apply (a record must never claim them)."""
    only_default: dict[str, list[object]] = {"n_cpu_moe": [0], "no_host": [False]}
    for name, allowed in only_default.items():
        bad = [v for v in getattr(p, name) if v not in allowed]
        if bad:
            raise UsageError(f"{name}={bad[0]!r}: pyllama bench supports only llama-bench's default ({allowed[0]!r})")
    # Checked here, not when the test's threadpool is created, so a bad value fails before any test runs.
    for mask in p.cpu_mask:
        try:
            parse_cpu_mask(mask)
        except ValueError as exc:
            raise UsageError(f"-C/--cpu-mask: {exc}") from None
    bad_poll = [v for v in p.poll if not 0 <= v <= 100]
    if bad_poll:
        raise UsageError(f"--poll {bad_poll[0]}: the polling level is 0...100")
    if p.prio not in PRIORITIES.values():
        raise UsageError(f"--prio {p.prio}: expected -1 (low), 0 (normal), 1 (medium), 2 (high) or 3 (realtime)")
    if "dio" in p.load_mode:
        raise UsageError("--load-mode dio is not supported by pyllama")
    if p.reps < 1:
        raise UsageError("--repetitions must be >= 1")
    if p.rpc and p.native and p.interleave == "rep":
        # ggml's RPC server serves one client at a time: pyllama must let go of
        # the servers (close its model) before llama-bench can use them.
        raise UsageError("-rpc with --native needs --interleave test")
    for ub, b in ((ub, b) for ub in p.n_ubatch for b in p.n_batch):
        if ub < 1 or b < 1:
            raise UsageError("batch sizes must be >= 1")
