"""Pre-load checks of multimodal projectors (``mmproj-*.gguf``): what libmtmd's loader and graphs crash on
instead of failing.

llama.cpp's clip loader (vendor/llama.cpp/tools/mtmd/clip.cpp) reads its keys with gguf's typed getters, which
assert on another type, and several tensors it loads as optional are used without a check (a segfault), or
with shapes ggml asserts on. :func:`check_projector_file` reads the file with llama.cpp's GGUF parser (metadata
only, :mod:`pyllama.gguf_check`'s) before ``mtmd_init_from_file`` and raises
:class:`~pyllama.errors.ModelLoadError` for them. The shape and presence checks cover the projector types the
test corpus holds (LLaVA's "mlp", Yi-VL's "mlp_norm", Qwen2-Audio's "qwen2a":
``tests/test_malformed_projector.py`` loads 1,149 mutants of them with 0 deaths); other types are left to
llama.cpp's own checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ._ffi import ffi, lib
from .errors import ModelLoadError
from .gguf_check import _Meta, check_tensor_alignment, checked_gguf


def check_projector_file(path: str | os.PathLike[str], *, n_embd_text: int | None = None) -> None:
    """Raise ModelLoadError for a multimodal projector llama.cpp cannot load or would crash on (see
    ``PROJECTOR_TENSORS``), before ``mtmd_init_from_file`` reads it."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"projector file not found: {os.fspath(path)}")
    with checked_gguf(path) as ctx:
        _check_projector(ctx, _ClipMeta(ctx, {}), n_embd_text)
        check_tensor_alignment(ctx)


class _ClipMeta(_Meta):
    """A projector's metadata as clip.cpp reads it: gguf_get_val_* take a one-element array of the type they
    read for the value itself."""

    def _single(self, key: str, gguf_type: int) -> int | None:
        i = self._id(key)
        if (i < 0 or lib.gguf_get_kv_type(self._ctx, i) != lib.GGUF_TYPE_ARRAY
                or lib.gguf_get_arr_type(self._ctx, i) != gguf_type or lib.gguf_get_arr_n(self._ctx, i) != 1):
            return None
        return i

    def string(self, key: str) -> str | None:
        i = self._single(key, lib.GGUF_TYPE_STRING)
        if i is None:
            return super().string(key)
        return str(ffi.string(lib.gguf_get_arr_str(self._ctx, i, 0)).decode("utf-8", "replace"))

    def flag(self, key: str) -> bool | None:
        i = self._single(key, lib.GGUF_TYPE_BOOL)
        if i is None:
            return super().flag(key)
        return bool(ffi.cast("int8_t *", lib.gguf_get_arr_data(self._ctx, i))[0])

    def real(self, key: str) -> float | None:
        i = self._single(key, lib.GGUF_TYPE_FLOAT32)
        if i is None:
            return super().real(key)
        return float(ffi.cast("float *", lib.gguf_get_arr_data(self._ctx, i))[0])


def _check_projector(ctx: Any, m: _Meta, n_embd_text: int | None) -> None:
    arch = m.string("general.architecture")
    if arch is not None and arch != "clip":
        raise ModelLoadError(f"general.architecture is {arch!r}, not 'clip': not a multimodal projector "
                             "(an mmproj-*.gguf file)")
    _check_projector_types(ctx)
    has = {mod: m.flag(f"clip.has_{mod}_encoder") for mod in ("vision", "audio")}
    if not any(has.values()):
        raise ModelLoadError("the projector has neither a vision nor an audio encoder (clip.has_vision_encoder, "
                             "clip.has_audio_encoder)")
    tensors = _Tensors(ctx)
    for mod, prefix in (("vision", "v"), ("audio", "a")):
        if not has[mod]:
            continue
        ptype = m.string("clip.projector_type") or m.string(f"clip.{mod}.projector_type") or ""  # clip.cpp's order
        if ptype == "qwen2.5o":  # clip.cpp turns Qwen2.5-Omni's type into qwen2.5vl / qwen2a per tower
            ptype = "qwen2a" if mod == "audio" else ptype
        if ptype == "mlp" and "mm.3.weight" in tensors:  # clip.cpp: Yi-VL's layout, a type without a name
            ptype = "mlp_norm"
        key = f"clip.{mod}."
        n_embd = m.integer(key + "embedding_length")
        n_head = m.integer(key + "attention.head_count")
        n_layer = m.integer(key + "block_count")
        if n_head is not None and n_embd is not None and (n_head <= 0 or n_embd % n_head):
            raise ModelLoadError(f"{key}attention.head_count ({n_head}) does not divide {key}embedding_length "
                                 f"({n_embd})")
        eps = m.real(key + "attention.layer_norm_epsilon")
        if eps is not None and not eps >= 0.0:  # NaN fails this too: ggml_norm asserts (GUARDS["norm_epsilon"])
            raise ModelLoadError(f"{key}attention.layer_norm_epsilon = {eps}: a normalisation epsilon must be >= 0")
        n_run = n_layer  # the blocks the graph runs
        if ptype in ("mlp", "mlp_norm") and n_layer is not None:
            n_run = _llava_features(m, n_layer)[0]
        needed = list(PROJECTOR_TENSORS.get(ptype, {}).get(mod, ()))
        if needed and n_run is not None:
            # Every block run; the first block missing ends the list (block_count may be 2**31).
            for i in range(max(n_run, 0)):
                block = [f"{prefix}.blk.{i}.{t}" for t in _BLOCK_TENSORS.get(ptype, ())]
                needed += block
                if any(t not in tensors for t in block):
                    break
        missing = [t for t in needed if t not in tensors]
        if missing:
            raise ModelLoadError(f"{mod} projector of type {ptype!r} lacks the tensor(s) {', '.join(missing[:6])}, "
                                 "which llama.cpp reads without checking (it would crash)")
        if n_embd is not None and n_head is not None and n_layer is not None and n_run is not None:
            tower = _Tower(m, tensors, mod, prefix, n_embd, n_head, n_layer, n_run)
            if ptype in ("mlp", "mlp_norm") and mod == "vision":
                tower.check_llava(normed=ptype == "mlp_norm")
            elif ptype == "qwen2a" and mod == "audio":
                tower.check_whisper()
        # The width libmtmd compares with the text model's (clip_n_mmproj_embd: the last projection's
        # outputs), else what the file says it is. A mismatch is refused by libmtmd too; this says why.
        last = {"mlp": "mm.2.weight", "mlp_norm": "mm.3.weight", "qwen2a": "mm.a.fc.weight"}.get(ptype, "")
        width = tensors.ne[last][1] if last in tensors else m.integer(key + "projection_dim")
        if n_embd_text is not None and width is not None and width > 0 and width != n_embd_text:
            raise ModelLoadError(f"the {mod} projector's output width ({width}) is not the text model's "
                                 f"embedding width ({n_embd_text}): it was made for another model")


#: The GGUF type of each metadata key clip.cpp reads with a typed getter (get_bool, get_i32, get_u32, get_f32,
#: get_string: gguf_get_val_bool/_i32/_u32/_f32/_str, which GGML_ASSERT the stored type, so a key stored as
#: another type -- an int32 image_size, a uint8 flag, a float64 epsilon, an array, a string -- aborts the
#: process). "{m}" is each tower's prefix (vision, audio, gen.audio). Arrays (get_arr_int, get_arr_f32) are
#: type-checked by clip.cpp itself. tests/test_malformed_projector.py checks this table against the vendored
#: clip.cpp and clip-impl.h.
PROJECTOR_KEY_TYPES: dict[str, int] = {
    **dict.fromkeys(("clip.has_vision_encoder", "clip.has_audio_encoder", "clip.has_gen_audio_encoder",
                     "clip.use_gelu", "clip.use_silu"), int(lib.GGUF_TYPE_BOOL)),
    "clip.minicpmv_version": int(lib.GGUF_TYPE_INT32),
    **dict.fromkeys(("clip.{m}.attention.layer_norm_epsilon", "clip.vision.swiglu_clamp"),
                    int(lib.GGUF_TYPE_FLOAT32)),
    **dict.fromkeys(("general.name", "general.description", "clip.projector_type", "clip.vision.projector_type",
                     "clip.audio.projector_type", "clip.gen.audio.projector_type", "clip.vision.mm_patch_merge_type",
                     "clip.gen.audio.model_variant"), int(lib.GGUF_TYPE_STRING)),
    **dict.fromkeys((
        "clip.{m}.embedding_length", "clip.{m}.feed_forward_length", "clip.{m}.block_count", "clip.{m}.projection_dim",
        "clip.{m}.attention.head_count", "clip.{m}.attention.head_count_kv", "clip.{m}.attention.head_dim",
        "clip.vision.image_size", "clip.vision.image_min_pixels", "clip.vision.image_max_pixels",
        "clip.vision.preproc_min_tiles", "clip.vision.preproc_max_tiles", "clip.vision.preproc_image_size",
        "clip.vision.patch_size", "clip.vision.projector.scale_factor", "clip.vision.projector.query_side",
        "clip.vision.projector.window_side", "clip.vision.spatial_merge_size", "clip.vision.n_wa_pattern",
        "clip.vision.window_size", "clip.minicpmv_query_num", "clip.vision.sam.head_count",
        "clip.vision.sam.block_count", "clip.vision.sam.embedding_length", "clip.vision.expert_used_count",
        "clip.audio.num_mel_bins", "clip.audio.projector.stack_factor", "clip.audio.chunk_size",
        "clip.audio.conv_kernel_size", "clip.audio.max_pos_emb", "clip.audio.projector.window_size",
        "clip.audio.projector.downsample_rate", "clip.audio.projector.head_count", "clip.audio.rvq.num_quantizers",
        "clip.audio.window_size", "clip.audio.local_block_count", "clip.audio.local_group_size",
        "clip.audio.subsampling_factor"), int(lib.GGUF_TYPE_UINT32)),
}
_KEY_TYPES = {k.replace("{m}", mod): t for k, t in PROJECTOR_KEY_TYPES.items()
              for mod in ("vision", "audio", "gen.audio")}
_GGUF_TYPE_NAMES = {int(getattr(lib, f"GGUF_TYPE_{n}")): n.lower() for n in (
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64", "INT64",
    "FLOAT64")}


def _check_projector_types(ctx: Any) -> None:
    """Keys clip.cpp reads must have the type it reads them as (PROJECTOR_KEY_TYPES); image_mean / image_std
    must be 3 float32 values (clip.cpp refuses other arrays itself: this only says so first)."""
    for i in range(int(lib.gguf_get_n_kv(ctx))):
        key = ffi.string(lib.gguf_get_key(ctx, i)).decode("utf-8", "replace")
        t = int(lib.gguf_get_kv_type(ctx, i))
        want = _KEY_TYPES.get(key)
        if t == lib.GGUF_TYPE_ARRAY and int(lib.gguf_get_arr_n(ctx, i)) == 1:  # gguf_get_val_* take [value]
            t = int(lib.gguf_get_arr_type(ctx, i))
        if want is not None and t != want:
            raise ModelLoadError(f"{key} is stored as {_GGUF_TYPE_NAMES.get(t, f'GGUF type {t}')}, not as the "
                                 f"{_GGUF_TYPE_NAMES[want]} llama.cpp reads it as (it would abort)")
        if key in ("clip.vision.image_mean", "clip.vision.image_std") and (
                t != lib.GGUF_TYPE_ARRAY or int(lib.gguf_get_arr_type(ctx, i)) != lib.GGUF_TYPE_FLOAT32
                or int(lib.gguf_get_arr_n(ctx, i)) < 3):
            raise ModelLoadError(f"{key} must be 3 float32 values (one per colour channel)")


_GGML_F32, _GGML_F16, _GGML_BF16 = int(lib.GGML_TYPE_F32), int(lib.GGML_TYPE_F16), int(lib.GGML_TYPE_BF16)
#: ggml types no matrix product takes as weights (integers, f64): a mutant with an i32 attn_q / mm.0 weight
#: segfaults, an i32 patch or position embedding aborts
_NOT_WEIGHTS = frozenset(int(getattr(lib, f"GGML_TYPE_{n}")) for n in ("I8", "I16", "I32", "I64", "F64"))
_GGML_TYPE_NAMES = {int(getattr(lib, f"GGML_TYPE_{n}")): n.lower() for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "I8", "I16", "I32", "I64", "F64")}


class _Tensors:
    """Name -> shape (ne, padded to 4 dimensions as ggml sees it) and ggml type of a GGUF file's tensors."""

    def __init__(self, ctx: Any) -> None:
        self.ne: dict[str, tuple[int, int, int, int]] = {}
        self.type: dict[str, int] = {}
        for t in range(int(lib.gguf_get_n_tensors(ctx))):
            name = ffi.string(lib.gguf_get_tensor_name(ctx, t)).decode("utf-8", "replace")
            dims = lib.gguf_get_tensor_ne(ctx, t)
            self.ne[name] = (int(dims[0]), int(dims[1]), int(dims[2]), int(dims[3]))
            self.type[name] = int(lib.gguf_get_tensor_type(ctx, t))

    def __contains__(self, name: object) -> bool:
        return name in self.ne

    def expect(self, name: str, *shape: int, role: str, why: str) -> None:
        """``name``, when present, must have ``shape`` (trailing dimensions 1) and a type fit for its ``role``:
        "vector" (f32: a norm, bias or embedding ggml adds, multiplies or concatenates with f32 activations;
        an f16 or q8_0 one aborts), "weight" (a matrix product's weights: not an integer type), "kernel" (a
        convolution: f32, f16 or bf16; a quantised kernel has no backend for im2col's product and aborts)."""
        if name not in self.ne:
            return
        want = tuple(shape) + (1,) * (4 - len(shape))
        if self.ne[name] != want:
            raise ModelLoadError(f"{name} has shape {_dims(self.ne[name])}, not {_dims(want)} ({why}): llama.cpp "
                                 "would abort on it, or broadcast it into wrong results")
        t = self.type[name]
        ok = (t == _GGML_F32 if role == "vector" else t not in _NOT_WEIGHTS if role == "weight"
              else t in (_GGML_F32, _GGML_F16, _GGML_BF16))
        if not ok:
            tname = _GGML_TYPE_NAMES.get(t, f"ggml type {t}")
            need = {"vector": "f32", "weight": "a float or quantised type", "kernel": "f32, f16 or bf16"}[role]
            raise ModelLoadError(f"{name} is of type {tname}; llama.cpp needs {need} there (it would crash)")


def _dims(ne: tuple[int, ...]) -> str:
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return "(" + ", ".join(str(d) for d in ne[:n]) + ")"


def _llava_features(m: _Meta, n_layer: int) -> tuple[int, int]:
    """models/llava.cpp: the blocks it runs (up to the deepest of clip.vision.feature_layer, else all but the
    last) and how many block outputs it stacks as the projector's input (0: just the last one's)."""
    layers = set(m.int_array("clip.vision.feature_layer") or ())
    deepest = max(layers, default=-1)
    n_run = deepest if deepest >= 0 else n_layer - 1
    return n_run, len({v for v in layers if 0 <= v <= n_run})


@dataclass
class _Tower:
    """The shapes one tower's graph combines (clip.cpp load_tensors, models/llava.cpp, models/whisper-enc.cpp,
    clip_graph::build_vit / build_attn / build_ffn), checked before llama.cpp builds it: ggml asserts on every
    operand that does not fit (ggml_mul_mat, ggml_add, ggml_concat, ggml_reshape, im2col), which aborts the
    process at load or at the first image or clip. Only tensors present are checked; which must be present
    is PROJECTOR_TENSORS' business."""

    m: _Meta
    t: _Tensors
    mod: str
    prefix: str
    n_embd: int
    n_head: int
    n_layer: int
    n_run: int  # the blocks the graph runs (LLaVA: up to its deepest feature layer)

    @property
    def d_head(self) -> int:
        head_dim = self.m.integer(f"clip.{self.mod}.attention.head_dim") or 0
        return head_dim if head_dim > 0 else self.n_embd // self.n_head  # clip.cpp's clip_graph()

    def blocks(self, *, n_head_kv: int, swap_ffn: bool, vit: bool) -> None:
        """Every block's norms, attention and feed-forward: llava.cpp's loop, or (``vit``) build_vit's, which
        also takes a fused QKV, Q/K norms, layer scales, post-norms and experts when a block has them."""
        e, p, t = self.n_embd, self.prefix, self.t
        q_width, kv_width = self.d_head * self.n_head, self.d_head * n_head_kv
        why_q = f"head_dim {self.d_head} x head_count {self.n_head}"
        why_kv = f"head_dim {self.d_head} x head_count_kv {n_head_kv}"
        for i in range(self.n_run):
            b = f"{p}.blk.{i}."
            if b + "attn_q.weight" not in t:  # (PROJECTOR_TENSORS has refused that already)
                break
            for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn_out.bias"):
                t.expect(b + name, e, role="vector", why=f"embedding_length {e}")
            t.expect(b + "attn_q.weight", e, q_width, role="weight", why=why_q)
            t.expect(b + "attn_q.bias", q_width, role="vector", why=why_q)
            for name in ("attn_k", "attn_v"):
                t.expect(b + name + ".weight", e, kv_width, role="weight", why=why_kv)
                t.expect(b + name + ".bias", kv_width, role="vector", why=why_kv)
            t.expect(b + "attn_out.weight", q_width, e, role="weight", why=why_q)
            up, down = b + "ffn_up.", b + "ffn_down."
            if swap_ffn and up + "weight" in t and down + "weight" in t and t.ne[down + "weight"][0] == e:
                up, down = down, up  # clip.cpp load_tensors: old LLaVA files name them the other way round
            if up + "weight" in t:
                n_ff = t.ne[up + "weight"][1]
                t.expect(up + "weight", e, n_ff, role="weight", why=f"embedding_length {e}")
                t.expect(up + "bias", n_ff, role="vector", why=f"the {n_ff} outputs of {up}weight")
                t.expect(b + "ffn_gate.weight", e, n_ff, role="weight", why=f"as {up}weight")
                t.expect(b + "ffn_gate.bias", n_ff, role="vector", why=f"as {up}weight")
                t.expect(down + "weight", n_ff, e, role="weight", why=f"the {n_ff} outputs of {up}weight")
            t.expect(down + "bias", e, role="vector", why=f"embedding_length {e}")
            if vit:
                self._vit_extras(b, q_width, kv_width)
        for name in (f"{p}.pre_ln.weight", f"{p}.pre_ln.bias", f"{p}.post_ln.weight", f"{p}.post_ln.bias"):
            t.expect(name, e, role="vector", why=f"embedding_length {e}")

    def _vit_extras(self, b: str, q_width: int, kv_width: int) -> None:
        t, e, d = self.t, self.n_embd, self.d_head
        if b + "ffn_gate_exps.weight" in t:  # build_moe_ffn asserts n_expert_used > 0: only some types set it
            raise ModelLoadError(f"{b}ffn_gate_exps.weight: expert feed-forward blocks are not used by this "
                                 "projector type (llama.cpp would abort on them)")
        fused = b + "attn_qkv.weight" in t
        # build_vit views Q, K and V in the fused product at 0, 1 and 2 times head_dim x head_count
        t.expect(b + "attn_qkv.weight", e, 3 * q_width, role="weight", why=f"Q, K and V of {q_width} each")
        t.expect(b + "attn_qkv.bias", 3 * q_width, role="vector", why=f"Q, K and V of {q_width} each")
        q_norm = t.ne.get(b + "attn_q_norm.weight")
        per_head = fused or (q_norm is not None and q_norm[0] == d)  # else a norm of the whole Q (and K) row
        t.expect(b + "attn_q_norm.weight", d if per_head else q_width, role="vector",
                 why=f"head_dim {d}" if per_head else f"Q's width {q_width} or head_dim {d}")
        t.expect(b + "attn_k_norm.weight", d if per_head else kv_width, role="vector",
                 why=f"head_dim {d}, as attn_q_norm" if per_head else f"K's width {kv_width}")
        for name in ("ls1", "ls2", "out_scale", "attn_post_norm", "ffn_post_norm"):
            t.expect(f"{b}{name}.weight", e, role="vector", why=f"embedding_length {e}")

    def check_llava(self, *, normed: bool) -> None:
        """LLaVA ("mlp"): patch convolution, class token, learned positions, the blocks, then mm.0 -> mm.2
        (``normed``, Yi-VL: mm.0 -> norm mm.1 -> mm.3 -> norm mm.4)."""
        m, t, e = self.m, self.t, self.n_embd
        image_size = m.integer("clip.vision.image_size") or 0
        patch = m.integer("clip.vision.patch_size") or 0
        if patch <= 0 or image_size < patch:
            raise ModelLoadError(f"clip.vision.patch_size ({patch}) must be positive and at most image_size "
                                 f"({image_size})")
        t.expect("v.patch_embd.weight", patch, patch, 3, e, role="kernel",
                 why=f"patch_size {patch}, 3 colour channels, embedding_length {e}")
        t.expect("v.patch_embd.bias", e, role="vector", why=f"embedding_length {e}")
        t.expect("v.class_embd", e, role="vector", why=f"embedding_length {e}")
        n_pos = (image_size // patch) ** 2 + (1 if "v.class_embd" in t else 0)
        pos = t.ne.get("v.position_embd.weight")
        if pos is not None:  # read with ggml_get_rows: any row count from n_pos up
            t.expect("v.position_embd.weight", e, max(pos[1], n_pos), role="weight",
                     why=f"an image of {image_size} pixels in patches of {patch} needs {n_pos} rows of {e}")
        self.blocks(n_head_kv=self.n_head, swap_ffn=True, vit=False)  # llava.cpp reshapes K and V with head_count
        stacked = _llava_features(m, self.n_layer)[1]
        width = e * max(stacked, 1)
        why = f"embedding_length {e}" + (f" x {stacked} stacked feature layers" if stacked > 1 else "")
        if "mm.0.weight" not in t:
            return
        t.expect("mm.0.weight", width, t.ne["mm.0.weight"][1], role="weight", why=why)
        hidden = t.ne["mm.0.weight"][1]
        t.expect("mm.0.bias", hidden, role="vector", why="the outputs of mm.0.weight")
        second = "mm.3" if normed else "mm.2"
        if normed:
            for name in ("mm.1.weight", "mm.1.bias"):
                t.expect(name, hidden, role="vector", why="the outputs of mm.0.weight")
        if second + ".weight" in t:
            out = t.ne[second + ".weight"][1]
            t.expect(second + ".weight", hidden, out, role="weight", why="the outputs of mm.0.weight")
            t.expect(second + ".bias", out, role="vector", why=f"the outputs of {second}.weight")
            if normed:
                for name in ("mm.4.weight", "mm.4.bias"):
                    t.expect(name, out, role="vector", why="the outputs of mm.3.weight")

    def check_whisper(self) -> None:
        """Qwen2-Audio ("qwen2a"): two 1-D convolutions over the mel spectrogram, learned positions, the blocks
        (K without bias), then mm.a.fc."""
        m, t, e = self.m, self.t, self.n_embd
        if self.n_layer < 1:  # whisper-enc.cpp reads model.layers[0] unchecked: a segfault
            raise ModelLoadError(f"clip.audio.block_count = {self.n_layer}: the audio encoder needs a block")
        n_mel = m.integer("clip.audio.num_mel_bins") or 0
        c_in, why_in = n_mel, f"num_mel_bins {n_mel} in"  # the mel spectrogram's rows
        for i in (1, 2):
            w = f"a.conv1d.{i}.weight"
            if w not in t:
                continue
            k, c_out = t.ne[w][0], (t.ne[w][2] if i == 1 else e)  # conv1d.2's output is the blocks' input
            if k % 2 == 0:  # ggml_conv_1d_ph pads k // 2: an even kernel changes the length the positions assume
                raise ModelLoadError(f"{w} has an even kernel size ({k}); the audio encoder keeps the length "
                                     "only with odd ones")
            t.expect(w, k, c_in, c_out, role="kernel", why=why_in + f", {c_out} out")
            t.expect(f"a.conv1d.{i}.bias", 1, c_out, role="vector", why=f"one bias per output channel of {w}")
            c_in, why_in = c_out, f"conv1d.1's {c_out} channels in"
        pos = t.ne.get("a.position_embd.weight")
        if pos is not None:
            if pos[1] < 1500:
                raise ModelLoadError("the audio projector's position embeddings have fewer than the 1500 rows its "
                                     "encoder uses")
            t.expect("a.position_embd.weight", e, pos[1], role="vector", why=f"embedding_length {e} per row")
        n_head_kv = m.integer("clip.audio.attention.head_count_kv")
        n_head_kv = self.n_head if n_head_kv is None else n_head_kv
        if n_head_kv <= 0 or self.n_head % n_head_kv:
            raise ModelLoadError(f"clip.audio.attention.head_count_kv ({n_head_kv}) does not divide head_count "
                                 f"({self.n_head})")
        if "a.blk.0.attn_k.bias" in t:  # whisper-enc.cpp: GGML_ASSERT(!model.layers[0].k_b)
            raise ModelLoadError("a.blk.0.attn_k.bias: the Whisper encoder's K projection has no bias "
                                 "(llama.cpp asserts there is none)")
        self.blocks(n_head_kv=n_head_kv, swap_ffn=False, vit=True)
        if "mm.a.fc.weight" in t:
            t.expect("mm.a.fc.weight", e, t.ne["mm.a.fc.weight"][1], role="weight", why=f"embedding_length {e}")
            t.expect("mm.a.fc.bias", t.ne["mm.a.fc.weight"][1], role="vector", why="the outputs of mm.a.fc.weight")


#: projector type -> modality -> tensors libmtmd reads without checking that its loader found them (a file
#: without one crashes llama-mtmd-cli with SIGSEGV instead of an error, or trips an assert); _BLOCK_TENSORS:
#: the same, per block. Measured on the projector types tests/synth.py writes (LLaVA's "mlp", Qwen2-Audio's
#: "qwen2a") by tests/test_malformed_projector.py; other types are left to llama.cpp's own checks.
PROJECTOR_TENSORS: dict[str, dict[str, tuple[str, ...]]] = {
    "mlp": {"vision": ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.0.bias",
                       "mm.2.weight", "mm.2.bias")},
    # an "mlp" file with mm.3.weight (Yi-VL): mm.0 -> norm mm.1 -> GELU -> mm.3 -> norm mm.4, no mm.2; a
    # mutant with mm.3.weight alone segfaults
    "mlp_norm": {"vision": ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.0.bias",
                            "mm.1.weight", "mm.1.bias", "mm.3.weight", "mm.3.bias", "mm.4.weight", "mm.4.bias")},
    "qwen2a": {"audio": ("a.position_embd.weight", "a.blk.0.ln1.weight", "a.blk.0.ln1.bias", "a.blk.0.ln2.weight",
                         "a.blk.0.ln2.bias", "a.blk.0.attn_q.bias", "a.blk.0.attn_v.bias")},
}
_BLOCK_TENSORS: dict[str, tuple[str, ...]] = {
    "mlp": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "mlp_norm": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    # attn_k / attn_v: build_vit multiplies by them unchecked (a segfault without one)
    "qwen2a": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
}




__all__ = ["check_projector_file", "PROJECTOR_KEY_TYPES", "PROJECTOR_TENSORS"]
