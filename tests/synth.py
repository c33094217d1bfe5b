"""Tiny synthetic GGUF models, written in milliseconds, for fast tests and benchmarks.

Real models are hundreds of megabytes; these are a few hundred kilobytes yet go
through exactly the same llama.cpp code paths: the "llama" architecture with
grouped-query attention, a real SentencePiece ("llama") vocabulary with byte
fallback and ChatML control tokens, a chat template, and a LoRA adapter whose
tensor shapes match what ``llama_adapter_lora_init`` checks.

Weights are random but reproducible: the same arguments always give a
byte-identical file, so a failure seen once can be reproduced anywhere.

Vocabulary layout (fixed, so tests can name ids):

====  =====================  =======
id    token                  type
====  =====================  =======
0     ``<unk>``              UNKNOWN
1     ``<s>`` (bos)          CONTROL
2     ``</s>`` (eos)         CONTROL
3+b   ``<0xBB>`` byte ``b``  BYTE     (ids 3..258)
259   ``<|im_start|>``       CONTROL
260   ``<|im_end|>`` (eot)   CONTROL
261+  ordinary pieces        NORMAL
====  =====================  =======

The output head never lets a control, unknown or byte token win a greedy
argmax (their rows of ``output.weight`` are zero while the others give logits
of a few units), so greedy generation runs to its full length and greedy text
is valid UTF-8. Byte tokens still appear when *tokenizing* text the vocabulary
does not cover (emoji, rare characters), which streaming tests rely on.

Command line, for bench scripts::

    python tests/synth.py OUT.gguf [--kind llama|embedding|lora --base BASE.gguf]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Union

import gguf
import numpy as np

__all__ = [
    "BOS_ID",
    "BYTE_BASE_ID",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "IM_END_ID",
    "IM_START_ID",
    "UNK_ID",
    "LlamaParams",
    "Vocab",
    "build_vocab",
    "write_embedding_model",
    "write_llama_model",
    "write_lora_adapter",
]

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_BASE_ID = 3  # id of <0x00>; byte b is BYTE_BASE_ID + b
IM_START_ID = BYTE_BASE_ID + 256  # 259
IM_END_ID = IM_START_ID + 1  # 260

SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Word-initial pieces (a leading "▁" is added); frequent words first so they get the best scores.
_WORDS = (
    "the a and of to in is it you that he was for on are with as have this from not but what all"
    " we can there which she do how their will people world hello Hello The"
    " le la les de et est un une pour que dans je bonjour café été très être à"
    " der die das und ist nicht ich mit für Hallo Welt schön über Straße"
)
# Pieces inside words (no leading "▁").
_SUBWORDS = "ing ed er es en tion ly re th he in an on at or st ou qu ch sch ent ment ung eur ée"
# Single characters; anything else (emoji, most of Unicode) falls back to byte tokens.
_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,!?;:'\"-()[]/&%*+=<>_#@"
    "éèêëàâçîïôûùœÉÀäöüßÄÖÜ"
    "日本语中文你好世界"
)
# Multi-character CJK pieces, reachable because their characters are pieces too.
_CJK_PIECES = ("日本", "日本语", "中文", "你好", "世界")


@dataclass(frozen=True)
class Vocab:
    """A SentencePiece vocabulary as the three parallel GGUF arrays."""

    tokens: list[str]
    scores: list[float]
    types: list[int]

    def id_of(self, token: str) -> int:
        """Id of an exact token text; raises ValueError when absent."""
        return self.tokens.index(token)


def _prefix_closure(pieces: Sequence[str]) -> list[str]:
    """Every piece preceded by all its prefixes of length >= 2.

    llama.cpp's SPM tokenizer only merges two *adjacent symbols* into a piece
    that exists in the vocabulary, so "▁the" is reachable only through an
    intermediate such as "▁th". Including every prefix guarantees a merge path.
    """
    out: dict[str, None] = {}
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            out.setdefault(piece[:end])
    return list(out)


def build_vocab() -> Vocab:
    """The fixed synthetic vocabulary (same on every call; see the module docstring)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * 2
    scores = [0.0] * len(tokens)

    multi = _prefix_closure(
        [SPACE + w for w in _WORDS.split()] + _SUBWORDS.split() + list(_CJK_PIECES)
    )
    pieces = list(dict.fromkeys([*multi, SPACE, *_CHARS]))
    taken = set(tokens)
    pieces = [p for p in pieces if p not in taken]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SentencePiece scores are log-probabilities: earlier (more frequent) pieces win merges.
    scores += [-float(rank) for rank in range(len(pieces))]
    if tokens[IM_END_ID] != "<|im_end|>" or len(set(tokens)) != len(tokens):
        raise RuntimeError("synthetic vocabulary layout is broken")  # llama.cpp asserts on duplicates
    return Vocab(tokens=tokens, scores=scores, types=[int(t) for t in types])


@dataclass(frozen=True)
class LlamaParams:
    """Hyper-parameters of a synthetic "llama" model (the defaults make a ~0.7 MB file)."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 512
    seed: int = 1234
    dtype: str = "f32"  # "f32", "f16", "q8_0" or "q4_0" for the block matrices; norms are always f32
    n_vocab: int = 0  # 0: the synthetic vocabulary as it is; more: padded with plain tokens to this size

    @property
    def head_dim(self) -> int:
        """Per-head width; llama requires rope.dimension_count to equal it."""
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Reject shapes llama.cpp would refuse, with a message naming the cause."""
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
        if self.head_dim % 2:
            raise ValueError("head_dim (n_embd / n_head) must be even for RoPE")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {self.dtype!r}")


_DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
           "q8_0": (np.float32, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (np.float32, gguf.LlamaFileType.MOSTLY_Q4_0)}
# Quantized variants quantize the transformer blocks' matrices (what CPU repack
# and AMX kernels act on); embeddings and the output head stay f32.
_QUANT = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}

PathLike = Union[str, "os.PathLike[str]"]


def weight_shapes(params: LlamaParams, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape (rows = outputs, as GGUF stores them reversed).

    The order is the write order, and also the order random numbers are drawn,
    so it must never change for a given set of parameters.
    """
    e, ff, q, kv = params.n_embd, params.n_ff, params.n_head * params.head_dim, params.n_head_kv * params.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, e)}
    for i in range(params.n_layer):
        blk = f"blk.{i}."
        shapes |= {
            blk + "attn_norm.weight": (e,),
            blk + "attn_q.weight": (q, e),
            blk + "attn_k.weight": (kv, e),
            blk + "attn_v.weight": (kv, e),
            blk + "attn_output.weight": (e, q),
            blk + "ffn_norm.weight": (e,),
            blk + "ffn_gate.weight": (ff, e),
            blk + "ffn_up.weight": (ff, e),
            blk + "ffn_down.weight": (e, ff),
        }
    shapes |= {"output_norm.weight": (e,), "output.weight": (n_vocab, e)}
    return shapes


def _random_weights(params: LlamaParams, vocab: Vocab) -> dict[str, np.ndarray]:
    """Seeded weights: 0.02-normal matrices, unit norms, and a louder output head.

    The output head is scaled so logits have a standard deviation of about 3:
    argmaxes are decisive and vary with the input, so greedy decoding does not
    collapse into one repeated token. Rows of tokens that must never win a
    greedy argmax (control, unknown, byte) are zeroed.
    """
    rng = np.random.default_rng(params.seed)
    n_vocab = len(vocab.tokens)
    weights: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(params, n_vocab).items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, dtype=np.float32)
        elif name == "output.weight":
            head = rng.normal(0.0, 3.0 / np.sqrt(params.n_embd), size=shape)
            head[np.asarray(vocab.types) != gguf.TokenType.NORMAL] = 0.0
            weights[name] = head
        else:
            weights[name] = rng.normal(0.0, 0.02, size=shape)
    np_dtype = _DTYPES[params.dtype][0]
    return {k: v.astype(np.float32 if v.ndim == 1 else np_dtype) for k, v in weights.items()}


def _atomic_write(path: Path, writer: gguf.GGUFWriter, tmp: Path) -> Path:
    """Finish a GGUF writer into ``tmp`` and rename it over ``path``.

    A reader (a parallel test worker, a bench script) never sees half a file.
    """
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


#: fill-in-the-middle control tokens (Qwen2.5-Coder's names), appended by write_fim_model, by GGUF key
FIM_TOKENS = {"fim_pre": "<|fim_prefix|>", "fim_suf": "<|fim_suffix|>", "fim_mid": "<|fim_middle|>",
              "fim_pad": "<|fim_pad|>", "fim_rep": "<|repo_name|>", "fim_sep": "<|file_sep|>"}


def _write_model(path: PathLike, params: LlamaParams, *, name: str, pooling: gguf.PoolingType | None,
                 fim: bool = False) -> Path:
    """Shared body of the model writers: hyper-parameters, tokenizer, tensors."""
    params.validate()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    vocab = build_vocab()
    if fim:
        vocab = Vocab(tokens=vocab.tokens + list(FIM_TOKENS.values()),
                      scores=vocab.scores + [0.0] * len(FIM_TOKENS),
                      types=vocab.types + [int(gguf.TokenType.CONTROL)] * len(FIM_TOKENS))
    if params.n_vocab:  # a large vocabulary (a real model's 262,144 logits) of pieces no text produces
        if params.n_vocab < len(vocab.tokens):
            raise ValueError(f"n_vocab must be 0 or at least {len(vocab.tokens)}")
        extra = params.n_vocab - len(vocab.tokens)
        low = min(vocab.scores) - 1.0
        vocab = Vocab(tokens=vocab.tokens + [f"<pad{i}>" for i in range(extra)],
                      scores=vocab.scores + [low - i for i in range(extra)],
                      types=vocab.types + [int(gguf.TokenType.NORMAL)] * extra)
    w = gguf.GGUFWriter(tmp, "llama")

    w.add_name(name)
    w.add_file_type(int(_DTYPES[params.dtype][1]))
    w.add_context_length(params.n_ctx_train)
    w.add_embedding_length(params.n_embd)
    w.add_block_count(params.n_layer)
    w.add_feed_forward_length(params.n_ff)
    w.add_head_count(params.n_head)
    w.add_head_count_kv(params.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(params.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(vocab.tokens))
    if pooling is not None:
        w.add_pooling_type(pooling)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_eot_token_id(IM_END_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML_TEMPLATE)
    if fim:
        for key, text in FIM_TOKENS.items():
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", vocab.tokens.index(text))

    qtype = _QUANT.get(params.dtype)
    for tensor_name, data in _random_weights(params, vocab).items():
        if qtype is not None and tensor_name.startswith("blk.") and data.ndim == 2:
            w.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(tensor_name, data)
    return _atomic_write(path, w, tmp)


def write_llama_model(
    path: PathLike,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    seed: int = 1234,
    dtype: str = "f32",
    n_vocab: int = 0,
) -> Path:
    """Write a tiny causal "llama" model with a real SentencePiece vocabulary; returns ``path``.

    ``n_vocab`` pads the vocabulary to that many tokens (a real model's logits row, for benchmarks)."""
    params = LlamaParams(n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx_train, seed, dtype, n_vocab)
    return _write_model(path, params, name="pyllama-synth-llama", pooling=None)


def write_embedding_model(
    path: PathLike,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    seed: int = 4321,
    dtype: str = "f32",
) -> Path:
    """Write a tiny "llama" model meant for embeddings; returns ``path``.

    Same architecture and vocabulary as :func:`write_llama_model` (llama.cpp has
    no small dedicated decoder-embedding arch that keeps a KV cache), plus
    ``llama.pooling_type = MEAN`` so a context created with
    ``LLAMA_POOLING_TYPE_UNSPECIFIED`` pools by mean, like most embedding models.
    """
    params = LlamaParams(n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx_train, seed, dtype)
    return _write_model(path, params, name="pyllama-synth-embedding", pooling=gguf.PoolingType.MEAN)


def write_fim_model(path: PathLike, *, seed: int = 1357) -> Path:
    """Write a tiny "llama" model whose vocabulary has fill-in-the-middle tokens (prefix, suffix, middle, pad,
    repository and file separators, as Qwen2.5-Coder's), for ``/infill``; returns ``path``."""
    return _write_model(path, LlamaParams(seed=seed), name="pyllama-synth-fim", pooling=None, fim=True)


def write_reranker_model(path: PathLike, *, seed: int = 2468) -> Path:
    """Write a tiny "llama" reranker: ``llama.pooling_type = RANK``; returns ``path``.

    llama.cpp scores a (query, document) sequence by the first unit of its last token's hidden state when
    the model has no classification head, as here: enough for /rerank's shapes and for the library's
    scores to match a hand-built sequence's, not for sensible rankings.
    """
    params = LlamaParams(seed=seed)
    return _write_model(path, params, name="pyllama-synth-reranker", pooling=gguf.PoolingType.RANK)


DEFAULT_LORA_TARGETS = ("attn_q", "attn_v", "ffn_up", "ffn_down", "output")


def _base_shapes(base: PathLike | LlamaParams) -> dict[str, tuple[int, ...]]:
    """Numpy shapes of the base model's tensors, from a GGUF file or from parameters."""
    if isinstance(base, LlamaParams):
        return weight_shapes(base, len(build_vocab().tokens))
    reader = gguf.GGUFReader(Path(base))
    # GGUFReader reports ggml's ne order (innermost first); numpy order is reversed.
    return {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}


def write_lora_adapter(
    path: PathLike,
    base: PathLike | LlamaParams = LlamaParams(),
    *,
    rank: int = 4,
    seed: int = 99,
    scale_alpha: float = 8.0,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> Path:
    """Write a LoRA adapter for a synthetic llama model; returns ``path``.

    ``base`` is the base GGUF file or the :class:`LlamaParams` it was written
    with. Each targeted 2-D weight ``W`` (numpy shape ``(n_out, n_in)``) gets
    ``<name>.lora_a`` of shape ``(rank, n_in)`` and ``<name>.lora_b`` of shape
    ``(n_out, rank)``, i.e. ggml ``ne = [n_in, rank]`` and ``[rank, n_out]``,
    which is what llama-adapter.cpp validates. Unlike a freshly initialised
    adapter (B = 0), B is random so applying the adapter visibly moves logits.
    llama.cpp scales the product by ``scale_alpha / rank`` times the user scale.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("pyllama-synth-lora")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale_alpha))
    n_pairs = 0
    for name, shape in _base_shapes(base).items():
        stem = name.removesuffix(".weight").split(".")[-1]
        if len(shape) != 2 or stem not in targets or name == "token_embd.weight":
            continue
        n_out, n_in = shape
        w.add_tensor(name + ".lora_a", rng.normal(0.0, 0.1, size=(rank, n_in)).astype(np.float32))
        w.add_tensor(name + ".lora_b", rng.normal(0.0, 0.1, size=(n_out, rank)).astype(np.float32))
        n_pairs += 1
    if n_pairs == 0:
        w.close()
        tmp.unlink(missing_ok=True)
        raise ValueError(f"no base tensor matches the LoRA targets {tuple(targets)}")
    return _atomic_write(path, w, tmp)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write one synthetic GGUF file and print its path."""
    parser = argparse.ArgumentParser(description="Write a tiny synthetic GGUF model for tests and benchmarks.")
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--kind", choices=("llama", "embedding", "lora"), default="llama")
    parser.add_argument("--base", type=Path, help="base model GGUF (required for --kind lora)")
    parser.add_argument("--n-layer", type=int, default=LlamaParams.n_layer)
    parser.add_argument("--n-embd", type=int, default=LlamaParams.n_embd)
    parser.add_argument("--n-head", type=int, default=LlamaParams.n_head)
    parser.add_argument("--n-head-kv", type=int, default=LlamaParams.n_head_kv)
    parser.add_argument("--n-ff", type=int, default=LlamaParams.n_ff)
    parser.add_argument("--n-ctx-train", type=int, default=LlamaParams.n_ctx_train)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="f32")
    parser.add_argument("--n-vocab", type=int, default=0, help="pad the vocabulary to this size (--kind llama)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (--kind lora)")
    parser.add_argument("--seed", type=int, help="default: 1234 llama, 4321 embedding, 99 lora")
    args = parser.parse_args(argv)

    if args.kind == "lora":
        if args.base is None:
            parser.error("--kind lora needs --base BASE.gguf")
        seed = 99 if args.seed is None else args.seed
        out = write_lora_adapter(args.out, args.base, rank=args.rank, seed=seed)
    else:
        embedding = args.kind == "embedding"
        seed = (4321 if embedding else 1234) if args.seed is None else args.seed
        writer = write_embedding_model if embedding else write_llama_model
        extra = {} if embedding else {"n_vocab": args.n_vocab}
        out = writer(
            args.out,
            **extra,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            n_head_kv=args.n_head_kv,
            n_ff=args.n_ff,
            n_ctx_train=args.n_ctx_train,
            seed=seed,
            dtype=args.dtype,
        )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
