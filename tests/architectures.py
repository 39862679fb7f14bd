"""Tiny random causal LMs of many Hugging Face architectures, each saved with a small local tokenizer (nothing is
downloaded), for tests that check memaudit on every architecture: `build(arch, root)` writes a model directory.

Tokenizers (`TOKENIZERS`): `bos` (memaudit's own: `<|endoftext|>` is BOS, EOS and padding, as GPT-2's), `eos`
(EOS only, no BOS, as some instruction-tuned tokenizers), `distinct` (`<s>` BOS, `</s>` EOS, as Llama's) and
`none` (neither). `extra_vocab` makes the model's embedding larger than the tokenizer, as Pythia's is.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Callable

import torch
import transformers as T

WIDTH, LAYERS, HEADS, CONTEXT = 32, 2, 4, 64
_WORDS = ("the model reads every token of a document and the cache keeps its keys and values so the next step "
          "only reads one new token while the loss of each member stays low").split()


def corpus(n: int = 24, words: int = 20, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


_ATT = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * WIDTH,
            max_position_embeddings=CONTEXT)
_ROT = dict(_ATT, num_key_value_heads=2)  # grouped-query attention where the family has it

# name -> a config from the common ids (vocab_size, bos_token_id, eos_token_id, pad_token_id)
ARCHITECTURES: dict[str, Callable[[dict], T.PretrainedConfig]] = {
    "gpt2": lambda ids: T.GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **ids),
    "gpt_neox": lambda ids: T.GPTNeoXConfig(**_ATT, rotary_pct=0.5, **ids),
    "llama": lambda ids: T.LlamaConfig(**_ROT, **ids),
    "mistral": lambda ids: T.MistralConfig(**_ROT, sliding_window=None, **ids),
    "mistral_sliding": lambda ids: T.MistralConfig(**_ROT, sliding_window=6, **ids),
    "mixtral": lambda ids: T.MixtralConfig(**_ROT, num_local_experts=4, num_experts_per_tok=2, **ids),
    "qwen2": lambda ids: T.Qwen2Config(**_ROT, **ids),
    "qwen3": lambda ids: T.Qwen3Config(**_ROT, head_dim=8, **ids),
    "phi": lambda ids: T.PhiConfig(**_ATT, **ids),
    "phi3": lambda ids: T.Phi3Config(**_ROT, **ids),
    "gptj": lambda ids: T.GPTJConfig(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, rotary_dim=4,
                                     **ids),
    "gpt_neo": lambda ids: T.GPTNeoConfig(hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                                          attention_types=[[["global", "local"], 1]], window_size=6,
                                          max_position_embeddings=CONTEXT, **ids),
    "gemma": lambda ids: T.GemmaConfig(**_ROT, head_dim=8, **ids),
    "gemma2": lambda ids: T.Gemma2Config(**_ROT, head_dim=8, sliding_window=6, **ids),
    "gemma3": lambda ids: T.Gemma3TextConfig(**_ROT, head_dim=8, sliding_window=6, **ids),
    "olmo2": lambda ids: T.Olmo2Config(**_ROT, **ids),
    "stablelm": lambda ids: T.StableLmConfig(**_ROT, **ids),
    "opt": lambda ids: T.OPTConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   ffn_dim=2 * WIDTH, word_embed_proj_dim=WIDTH, max_position_embeddings=CONTEXT,
                                   **ids),
    "bloom": lambda ids: T.BloomConfig(hidden_size=WIDTH, n_layer=LAYERS, n_head=HEADS, **ids),
    "falcon": lambda ids: T.FalconConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         max_position_embeddings=CONTEXT, **ids),
    "mamba": lambda ids: T.MambaConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, state_size=8, expand=2,
                                       **ids),
    # more state-space models and attention + state-space hybrids (recurrent caches)
    "mamba2": lambda ids: T.Mamba2Config(hidden_size=WIDTH, num_hidden_layers=LAYERS, state_size=8, expand=2,
                                         num_heads=8, head_dim=8, n_groups=1, chunk_size=8, **ids),
    "falcon_mamba": lambda ids: T.FalconMambaConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, state_size=8,
                                                    expand=2, **ids),
    "jamba": lambda ids: T.JambaConfig(**_ROT, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=4,
                                       attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                       expert_layer_offset=1, num_experts=2, **ids),
    "bamba": lambda ids: T.BambaConfig(**_ROT, mamba_d_state=8, mamba_d_head=8, mamba_n_heads=8,
                                       attn_layer_indices=[1], mamba_chunk_size=8, **ids),
    "lfm2": lambda ids: T.Lfm2Config(**_ROT, full_attn_idxs=[1], **ids),
}

# Architectures whose cache memaudit's decoding loops cannot drive (RWKV's forward takes a `state`, RecurrentGemma
# keeps its state inside the model): decoding is refused up front, scoring (a forward without a cache) works.
UNDECODABLE: dict[str, Callable[[dict], T.PretrainedConfig]] = {
    "rwkv": lambda ids: T.RwkvConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, attention_hidden_size=WIDTH,
                                     intermediate_size=2 * WIDTH, context_length=CONTEXT, **ids),
    "recurrent_gemma": lambda ids: T.RecurrentGemmaConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=2 * WIDTH, lru_width=WIDTH, attention_window_size=8, block_types=["recurrent", "attention"],
        **ids),
}

TOKENIZERS = ("bos", "eos", "distinct", "none")


@functools.lru_cache(maxsize=None)
def _bpe(kind: str):
    """A byte-level BPE of ~300 tokens on `corpus()`, its special tokens as `kind` says (trained once)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = {"bos": ["<|endoftext|>"], "eos": ["<|endoftext|>"], "distinct": ["<s>", "</s>"],
                "none": ["<pad>"]}[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def tokenizer(kind: str = "bos") -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    obj = Tokenizer.from_str(_bpe(kind))
    named = {"bos": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
             "eos": dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
             "distinct": dict(bos_token="<s>", eos_token="</s>", pad_token="</s>"),
             "none": dict(pad_token="<pad>")}[kind]
    return T.PreTrainedTokenizerFast(tokenizer_object=obj, **named)


def config(arch: str, tok, extra_vocab: int = 0) -> T.PretrainedConfig:
    ids = dict(vocab_size=len(tok) + extra_vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return {**ARCHITECTURES, **UNDECODABLE}[arch](ids)


def build(arch: str, root: str | Path, kind: str = "bos", *, extra_vocab: int = 0, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> Path:
    """A random `arch` model with the `kind` tokenizer, saved to `root` (safetensors); returns `root`."""
    root = Path(root)
    tok = tokenizer(kind)
    cfg = config(arch, tok, extra_vocab)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _widen(model, seed)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _widen(model: torch.nn.Module, seed: int) -> None:
    """Scale the random weights up so greedy tokens are decided by clear margins (float rounding between two
    batchings then never flips an argmax) and outputs vary with the context."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) / p.shape[-1] ** 0.5)
