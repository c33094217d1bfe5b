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
    python tests/synth.py MMPROJ.gguf --kind projector [--n-embd TEXT_N_EMBD --modality vision|audio|both]
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
    "BERT_CLS_ID",
    "BERT_MASK_ID",
    "BERT_PAD_ID",
    "BERT_SEP_ID",
    "BERT_SPECIAL_TOKENS",
    "BERT_UNK_ID",
    "BOS_ID",
    "BYTE_BASE_ID",
    "CHATML_TEMPLATE",
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "EOS_ID",
    "IM_END_ID",
    "IM_START_ID",
    "UNK_ID",
    "LlamaParams",
    "Vocab",
    "build_vocab",
    "build_wpm_vocab",
    "png_bytes",
    "projector_shapes",
    "write_audio",
    "write_bert_reranker",
    "write_embedding_model",
    "write_image",
    "write_llama_model",
    "write_lora_adapter",
    "write_projector",
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


#: write_bert_reranker's WordPiece vocabulary starts with BERT's special tokens, at these ids
BERT_PAD_ID, BERT_UNK_ID, BERT_CLS_ID, BERT_SEP_ID, BERT_MASK_ID = range(5)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BERT_WORDS = ("the a and of to in is it you that for on are with as this from not what all can how people world"
               " hello machine learning paris capital france cat dog sat mat river bank money water city rain")
_BERT_SUBWORDS = "s ing ed er es ly tion ment"  # "##ing" and so on: pieces inside a word, no "▁"
_BERT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"-()[]/&%*+=<>_#@"


def build_wpm_vocab() -> list[str]:
    """write_bert_reranker's WordPiece ("bert") vocabulary, as convert_hf_to_gguf.py stores one.

    Word-initial pieces carry "▁" (BERT's plain tokens), pieces inside a word none (BERT's "##" ones); every
    lower-case letter, digit and ASCII punctuation mark is a piece both ways, so any lower-case ASCII text
    tokenizes without [UNK] (llama.cpp's WPM tokenizer lower-cases and strips accents by default).
    """
    words = [SPACE + w for w in _BERT_WORDS.split()]
    tokens = list(dict.fromkeys([*BERT_SPECIAL_TOKENS, *words, *_BERT_SUBWORDS.split(),
                                 *(SPACE + c for c in _BERT_CHARS), *_BERT_CHARS]))
    if tokens[:len(BERT_SPECIAL_TOKENS)] != list(BERT_SPECIAL_TOKENS):
        raise RuntimeError("synthetic WordPiece vocabulary layout is broken")
    return tokens


def write_bert_reranker(path: PathLike, *, seed: int = 8642, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                        n_ff: int = 128, n_ctx_train: int = 512, special_tokens: str = "converted",
                        rerank_template: str | None = None) -> Path:
    """Write a tiny cross-encoder reranker of the "bert" architecture (bge-reranker's); returns ``path``.

    A WordPiece vocabulary (:func:`build_wpm_vocab`), token-type and learned position embeddings, post-norm
    layers with biases, ``bert.pooling_type = RANK`` and a classification head: llama.cpp scores a sequence as
    ``cls.output(tanh(cls(h[CLS])))``, one logit (no sigmoid). Weights are seeded and large enough that
    attention mixes the whole sequence into [CLS], so scores vary with the document.

    ``special_tokens``: ``"converted"`` writes what convert_hf_to_gguf.py writes for a BERT cross-encoder
    (EOS = [SEP], add BOS and EOS, no extra SEP), so llama-server's /rerank sequence is HF's
    ``[CLS] query [SEP] document [SEP]``; ``"defaults"`` leaves EOS and the add_* flags out, so llama.cpp's
    WPM defaults apply (add BOS and SEP, no EOS): ``[CLS] query [SEP] document`` in llama-server.
    ``rerank_template`` (``{query}`` and ``{document}`` in a text) is written as the ``rerank`` chat template
    (``tokenizer.chat_template.rerank``, as Qwen3-Reranker's), which llama.cpp then lays the pair out with.
    """
    if special_tokens not in ("converted", "defaults"):
        raise ValueError(f"special_tokens must be 'converted' or 'defaults', not {special_tokens!r}")
    if n_embd % n_head:
        raise ValueError("n_embd must divide by n_head")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tokens = build_wpm_vocab()
    n_types = 2
    types = [int(gguf.TokenType.CONTROL)] * len(BERT_SPECIAL_TOKENS)
    types += [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(BERT_SPECIAL_TOKENS))

    w = gguf.GGUFWriter(tmp, "bert")
    w.add_name("pyllama-synth-bert-reranker")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.RANK)
    w.add_token_type_count(n_types)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(BERT_CLS_ID)
    w.add_unk_token_id(BERT_UNK_ID)
    w.add_sep_token_id(BERT_SEP_ID)
    w.add_pad_token_id(BERT_PAD_ID)
    w.add_mask_token_id(BERT_MASK_ID)
    if special_tokens == "converted":
        w.add_eos_token_id(BERT_SEP_ID)
        w.add_add_bos_token(True)
        w.add_add_eos_token(True)
        w.add_add_sep_token(False)
    if rerank_template is not None:
        w.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="rerank"), rerank_template)

    # Tensor name -> numpy shape (rows = outputs); the order is the order random numbers are drawn.
    e, ff = n_embd, n_ff
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (len(tokens), e), "token_types.weight": (n_types, e),
        "position_embd.weight": (n_ctx_train, e), "token_embd_norm.weight": (e,), "token_embd_norm.bias": (e,)}
    for i in range(n_layer):
        blk = f"blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes |= {blk + name + ".weight": (e, e), blk + name + ".bias": (e,)}
        shapes |= {blk + "attn_output_norm.weight": (e,), blk + "attn_output_norm.bias": (e,),
                   blk + "ffn_up.weight": (ff, e), blk + "ffn_up.bias": (ff,),
                   blk + "ffn_down.weight": (e, ff), blk + "ffn_down.bias": (e,),
                   blk + "layer_output_norm.weight": (e,), blk + "layer_output_norm.bias": (e,)}
    shapes |= {"cls.weight": (e, e), "cls.bias": (e,), "cls.output.weight": (1, e), "cls.output.bias": (1,)}
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            data = 1.0 + rng.normal(0.0, 0.1, size=shape)
        elif len(shape) == 1:
            data = rng.normal(0.0, 0.1, size=shape)
        elif name.endswith("_embd.weight") or name == "token_types.weight":
            data = rng.normal(0.0, 1.0, size=shape)
        else:  # a matrix that keeps its input's scale, so attention is far from uniform
            data = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), size=shape)
        w.add_tensor(name, data.astype(np.float32))
    return _atomic_write(path, w, tmp)


# Multimodal projectors ("mmproj" files) for libmtmd (tools/mtmd), and media to feed them.
#
# libmtmd trusts a projector's tensors: clip.cpp loads most of them as optional and only finds out
# when it builds the graph (at load, for its warm-up) or runs it (at the first image). A missing
# v.patch_embd.weight, v.position_embd.weight, attn_q/k/v weight or any mm.0/mm.2 tensor of an
# "mlp" projector is a segfault, a key of the wrong GGUF type (an int32 image_size) or a shape that
# disagrees with the keys is a GGML_ASSERT abort, and too few v.position_embd rows for
# (image_size / patch_size)^2 (+1 with v.class_embd) aborts only when the first image is encoded.


#: CLIP's pixel normalisation (OpenAI CLIP, as LLaVA-1.5 uses): ``(x / 255 - mean) / std`` per RGB channel
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: Qwen2-Audio's whisper front end: 128 mel bins, 30 s windows of 3000 frames, 1500 positions after the conv
AUDIO_N_MEL = 128
AUDIO_N_POS = 1500


def projector_shapes(*, n_embd_text: int = 64, image_size: int = 32, patch_size: int = 8, n_embd: int = 32,
                     n_ff: int = 64, n_layer: int = 2, vision: bool = True,
                     audio: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape of :func:`write_projector`'s file (rows = outputs; GGUF stores them reversed).

    The order is the write order and the order random numbers are drawn. Vision is LLaVA-1.5's
    layout ("mlp"): a CLIP ViT (conv patch embedding without bias, class embedding, learned
    positions, pre-layernorm, pre-norm blocks with biases) then ``mm.0`` -> GELU -> ``mm.2``.
    Audio is Qwen2-Audio's ("qwen2a"): a whisper encoder (two conv1d, learned positions, blocks
    whose attn_k has no bias, post-layernorm) then ``mm.a.fc``.
    """
    e, ff, t = n_embd, n_ff, n_embd_text
    shapes: dict[str, tuple[int, ...]] = {}

    def blocks(prefix: str, k_bias: bool) -> None:
        for i in range(n_layer):
            blk = f"{prefix}.blk.{i}."
            shapes.update({blk + "ln1.weight": (e,), blk + "ln1.bias": (e,)})
            for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
                shapes[blk + proj + ".weight"] = (e, e)
                if proj != "attn_k" or k_bias:
                    shapes[blk + proj + ".bias"] = (e,)
            shapes.update({blk + "ln2.weight": (e,), blk + "ln2.bias": (e,),
                           blk + "ffn_up.weight": (ff, e), blk + "ffn_up.bias": (ff,),
                           blk + "ffn_down.weight": (e, ff), blk + "ffn_down.bias": (e,)})

    if vision:
        n_pos = (image_size // patch_size) ** 2 + 1  # + the class embedding
        shapes |= {"v.patch_embd.weight": (e, 3, patch_size, patch_size),  # ggml ne [kw, kh, 3, n_embd]
                   "v.class_embd": (e,),
                   "v.position_embd.weight": (n_pos, e),
                   "v.pre_ln.weight": (e,), "v.pre_ln.bias": (e,)}
        blocks("v", k_bias=True)
        shapes |= {"mm.0.weight": (t, e), "mm.0.bias": (t,), "mm.2.weight": (t, t), "mm.2.bias": (t,)}
    if audio:
        shapes |= {"a.conv1d.1.weight": (e, AUDIO_N_MEL, 3), "a.conv1d.1.bias": (e, 1),  # ggml ne [3, n_mel, e]
                   "a.conv1d.2.weight": (e, e, 3), "a.conv1d.2.bias": (e, 1),  # bias ne [1, e]: per channel
                   "a.position_embd.weight": (AUDIO_N_POS, e)}
        blocks("a", k_bias=False)
        shapes |= {"a.post_ln.weight": (e,), "a.post_ln.bias": (e,),
                   "mm.a.fc.weight": (t, e), "mm.a.fc.bias": (t,)}
    return shapes


def _projector_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One seeded tensor: unit norms, zero-mean biases, 1/sqrt(fan_in) matrices (so activations stay O(1))."""
    if name.endswith(("ln1.weight", "ln2.weight", "pre_ln.weight", "post_ln.weight")):
        return np.ones(shape, dtype=np.float32)
    if name.endswith("bias"):
        return rng.normal(0.0, 0.1, size=shape).astype(np.float32)
    if name.endswith(("class_embd", "position_embd.weight")):
        return rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape).astype(np.float32)


def write_projector(
    path: PathLike,
    *,
    n_embd_text: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    n_embd: int = 32,
    n_head: int = 4,
    n_ff: int = 64,
    n_layer: int = 2,
    seed: int = 97531,
    vision: bool = True,
    audio: bool = False,
) -> Path:
    """Write a tiny multimodal projector ("mmproj") GGUF for libmtmd; returns ``path``.

    ``n_embd_text`` must equal the text model's ``n_embd`` (libmtmd refuses a mismatch). The vision
    tower is projector type "mlp" (LLaVA-1.5): libmtmd resizes an image, keeping its aspect ratio,
    into an ``image_size`` square (bicubic, padded with grey (122, 116, 104)), normalises it with
    :data:`CLIP_IMAGE_MEAN` / :data:`CLIP_IMAGE_STD`, and every image becomes
    ``(image_size // patch_size) ** 2`` embeddings (16 by default), with no marker tokens around
    them. As in LLaVA, the last of the ``n_layer`` blocks is loaded but not run (features come
    from the one before), so ``n_layer=1`` means no attention at all.

    ``audio=True`` adds a Qwen2-Audio ("qwen2a") whisper encoder; with ``vision=False`` too the file
    is audio only. Audio is cut into 30 s windows and each full window becomes 750 embeddings,
    wrapped in the text ``<|audio_bos|>`` ... ``<|audio_eos|>``. With both, the file is laid out as
    Qwen2.5-Omni's: ``clip.vision.projector_type`` and ``clip.audio.projector_type`` instead of one
    ``clip.projector_type``.

    All tensors are f32 (libmtmd's conv kernels accept f32 weights). The weights keep activations
    O(1), so different images (or clips) give different embeddings and, with the synthetic text
    model, different greedy continuations; the text model's tiny attention weights let an image
    sway the logits only a little, so compare several greedy tokens, not just the first.
    """
    if not (vision or audio):
        raise ValueError("a projector needs vision, audio or both")
    if n_embd % n_head:
        raise ValueError("n_embd must divide by n_head")
    if vision and (image_size % patch_size or image_size < patch_size):
        raise ValueError("image_size must be a positive multiple of patch_size")
    if n_layer < 1:
        raise ValueError("n_layer must be at least 1")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "clip")
    w.add_name("pyllama-synth-mmproj")
    w.add_description("tiny synthetic multimodal projector for tests")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_bool("clip.has_vision_encoder", vision)
    w.add_bool("clip.has_audio_encoder", audio)
    if vision and audio:
        w.add_string("clip.vision.projector_type", "mlp")
        w.add_string("clip.audio.projector_type", "qwen2a")
    else:
        w.add_string("clip.projector_type", "mlp" if vision else "qwen2a")
    w.add_bool("clip.use_gelu", False)  # the vision blocks use quick GELU, as CLIP's; audio always uses erf GELU
    for modality, on in (("vision", vision), ("audio", audio)):
        if not on:
            continue
        w.add_uint32(f"clip.{modality}.embedding_length", n_embd)
        w.add_uint32(f"clip.{modality}.feed_forward_length", n_ff)
        w.add_uint32(f"clip.{modality}.block_count", n_layer)
        w.add_uint32(f"clip.{modality}.attention.head_count", n_head)
        w.add_float32(f"clip.{modality}.attention.layer_norm_epsilon", 1e-5)
        w.add_uint32(f"clip.{modality}.projection_dim", n_embd_text)
    if vision:
        w.add_bool("clip.has_llava_projector", True)  # informational; clip.cpp derives it from the type
        w.add_uint32("clip.vision.image_size", image_size)
        w.add_uint32("clip.vision.patch_size", patch_size)
        w.add_array("clip.vision.image_mean", list(CLIP_IMAGE_MEAN))
        w.add_array("clip.vision.image_std", list(CLIP_IMAGE_STD))
    if audio:
        w.add_uint32("clip.audio.num_mel_bins", AUDIO_N_MEL)

    rng = np.random.default_rng(seed)
    shapes = projector_shapes(n_embd_text=n_embd_text, image_size=image_size, patch_size=patch_size, n_embd=n_embd,
                              n_ff=n_ff, n_layer=n_layer, vision=vision, audio=audio)
    for name, shape in shapes.items():
        w.add_tensor(name, _projector_weight(name, shape, rng))
    return _atomic_write(path, w, tmp)


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (uint8, shape ``(height, width, 3)``), written without Pillow."""
    import struct
    import zlib

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError("pixels must have shape (height, width, 3)")
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def write_image(path: PathLike, *, width: int = 32, height: int = 32, seed: int = 0) -> Path:
    """Write a PNG of a seeded colour under mild noise (same arguments, same bytes); returns ``path``.

    Images of different seeds differ as a whole (their colour), which survives the text model's
    near-uniform attention over the image's embeddings; images of pure noise look alike to it.
    """
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, size=3)
    noise = rng.integers(-24, 25, size=(height, width, 3))
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png_bytes(pixels))
    os.replace(tmp, path)
    return path


def write_audio(path: PathLike, *, seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0) -> Path:
    """Write a mono 16-bit WAV of seeded noise over a tone (same arguments, same bytes); returns ``path``.

    libmtmd's whisper front end appends 30 s of silence and keeps the full 30 s windows, so any
    clip up to 30 s long becomes one window: 750 embeddings with a "qwen2a" projector.
    """
    import wave

    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (200.0 + 50.0 * (seed % 16)) * t)
    samples = np.clip(tone + rng.normal(0.0, 0.1, size=n), -1.0, 1.0)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    os.replace(tmp, path)
    return path


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
    parser.add_argument("--kind", choices=("llama", "embedding", "lora", "projector"), default="llama",
                        help="projector: an mmproj for a text model of width --n-embd")
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
    parser.add_argument("--modality", choices=("vision", "audio", "both"), default="vision",
                        help="the encoders of --kind projector")
    parser.add_argument("--seed", type=int, help="default: 1234 llama, 4321 embedding, 99 lora, 97531 projector")
    args = parser.parse_args(argv)

    if args.kind == "projector":
        seed = 97531 if args.seed is None else args.seed
        out = write_projector(args.out, n_embd_text=args.n_embd, seed=seed, vision=args.modality != "audio",
                              audio=args.modality != "vision")
    elif args.kind == "lora":
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
