"""Shared fixtures: tiny random-weight models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run compiled where a GPU is present; without one, Triton's CPU interpreter runs them on CPU tensors.
# TRITON_INTERPRET must be set before anything imports triton (torch._dynamo and torch._inductor do); importing torch
# and asking for CUDA does not import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: CUDA cases run where torch.cuda.is_available()")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
"""Device parameters of the op and kernel tests: every case runs on the CPU, and on CUDA where a GPU is present."""

from transformers import (AutoModelForCausalLM, FalconConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          MistralConfig, OPTConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gradmap.adapters import get_adapter
from gradmap.data import Calibration

VOCAB = 96
NUM_LAYERS = 6
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
COMMON = dict(**TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=False),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "phi3": lambda: Phi3Config(**COMMON),
    # sliding window 8 < the 16-token windows and 24-token generations of the tests, so the local layers matter;
    # layer_types alternate sliding / full, so trimming them in step is checked
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=8),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"] * 3),
    "gpt2": lambda: GPT2Config(**TOKENS, n_embd=32, n_inner=64, n_layer=NUM_LAYERS, n_head=4, n_positions=128,
                               tie_word_embeddings=False),
    "opt": lambda: OPTConfig(**TOKENS, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_hidden_layers=NUM_LAYERS,
                             num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False),
    "falcon": lambda: FalconConfig(**TOKENS, hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                                   max_position_embeddings=128, tie_word_embeddings=False),
}
FAMILIES = tuple(CONFIGS)


def tiny_model(family: str = "llama", seed: int = 0, tied: bool = False, dtype=torch.float32):
    """A tiny random-weight ``*ForCausalLM`` of ``family`` (6 layers, hidden 32), deterministic in ``seed``."""
    config = CONFIGS[family]()
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init has tiny residual branches; scale them up so layers matter and scores differ clearly.
    with torch.no_grad():
        for p in get_adapter(model).layers(model).parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def random_calibration(nsamples=4, seqlen=16, seed=0, pad_last: int = 0) -> Calibration:
    """Random token windows; the last ``pad_last`` positions of every second window are padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (nsamples, seqlen), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[1::2, seqlen - pad_last:] = 0
        ids[1::2, seqlen - pad_last:] = 0
    return Calibration(ids, mask, {"source": "random", "nsamples": nsamples, "seqlen": seqlen, "seed": seed})


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer trained in-process on a fixed text (vocab ≤ VOCAB)."""
    return make_tokenizer()


def make_tokenizer():
    """A small byte-level BPE tokenizer trained in-process on :data:`SAMPLE_TEXT` (vocab ≤ VOCAB), deterministic."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60], show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    return fast


SAMPLE_TEXT = (
    "the cat sat on the mat and the dog sat on the log. a bird sang in the tree while the sun rose over the hill. "
    "people walked to the market to buy bread, milk and eggs; the baker sold fresh bread every morning. "
) * 20
