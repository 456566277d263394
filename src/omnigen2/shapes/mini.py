"""The miniature OmniGen2: tokenizer, MLLM, VAE and transformer configs of the bundled Shapes model.

Same architecture and file layout as the released model, scaled down so that the whole pipeline trains on
a laptop CPU and runs a 64x64 generation in well under a second:

- tokenizer: a byte-level BPE trained on the Shapes grammar, with Qwen's special tokens (including the
  vision tokens and ``<|img|>``) and the Qwen chat template;
- MLLM: ``Qwen2_5_VLForConditionalGeneration`` with a 4-layer, 128-wide language model and a 2-block vision
  tower on 8x8 patches (a 64x64 image becomes 16 visual tokens after the 2x2 merge);
- VAE: ``AutoencoderKL`` with 4x downsampling to 8 latent channels (64x64 -> 16x16);
- transformer: ``OmniGen2Transformer2DModel`` with patch 2 (64 image tokens), conditioned on the MLLM's
  128-wide hidden states.
"""

from __future__ import annotations

from collections.abc import Iterable

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<|img|>",
]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer in the Qwen layout (special tokens first, then the learned merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def vision_config(hidden: int = 128, depth: int = 2, vision_hidden: int = 64, patch: int = 8) -> dict:
    """The vision tower of the miniature (Qwen2.5-VL's ViT): 8x8 patches, 2x2 merge, windows of 2x2 merged
    tokens, full attention in the last block; ``hidden`` is the language model's width (the merger's output)."""
    return dict(
        depth=depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=max(2, vision_hidden // 32),
        out_hidden_size=hidden,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=4 * patch,
        fullatt_block_indexes=[depth - 1],
        in_channels=3,
    )


def mllm_config(tokenizer, hidden: int = 128, layers: int = 4, vision_hidden: int = 64, patch: int = 8):
    """A tiny Qwen2.5-VL config whose special-token ids match ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = max(2, hidden // 32)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [hidden // heads // 8, hidden // heads // 8 * 3 // 2, hidden // heads // 8 * 3 // 2],
            },
            tie_word_embeddings=True,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=vision_config(hidden, 2, vision_hidden, patch),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def image_processor_config(patch: int = 8) -> dict:
    """Qwen2-VL image-processor settings: a 64x64 image stays 64x64 (a multiple of patch x merge)."""
    return {
        "min_pixels": (2 * patch) ** 2,
        "max_pixels": 128 * 128,
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=8,  # 4 channels lose the 6-px dots and blur crosses below the judge's shape fit
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16,
    act_fn="silu",
    sample_size=64,
    mid_block_add_attention=False,
)


def transformer_config(text_feat_dim: int = 128, hidden: int = 128, layers: int = 6, in_channels: int = 8) -> dict:
    heads = hidden // 32  # head dim 32 = the RoPE axes 8 + 12 + 12
    return dict(
        patch_size=2,
        in_channels=in_channels,
        hidden_size=hidden,
        num_layers=layers,
        num_refiner_layers=1,
        num_attention_heads=heads,
        num_kv_heads=heads // 2 if heads % 2 == 0 else heads,  # grouped queries need heads % kv_heads == 0
        multiple_of=32,
        axes_dim_rope=(8, 12, 12),
        axes_lens=(1024, 1024, 1024),
        text_feat_dim=text_feat_dim,
        timestep_scale=1000.0,
    )
