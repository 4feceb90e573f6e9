"""A tiny FLUX-architecture pipeline built fully offline from configs.

`build_tiny_pipeline(seed)` assembles a stock `diffusers.FluxPipeline` from the same classes
FLUX.1-schnell uses (FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel,
FlowMatchEulerDiscreteScheduler), only with tiny configs and randomly initialised weights.
It needs no files and no network, runs a 4-step 32x32 generation on a CPU in milliseconds, and
is deterministic for a seed. Tests use it as a stand-in for the real model; the toy model (a
later issue) starts from the same architecture and trains it.

Shapes at the recommended settings (`TINY_RECOMMENDED`): image 32x32 -> latent 4x16x16 ->
packed image stream of 8x8 = 64 tokens x 16 channels; text stream = 32 T5 tokens; d_model 96.

The tokenizers are word-level WordPiece tokenizers built in code from `WORDS` (a fixed list of
colours, shapes and common text-to-image words) plus single letters/digits and their "##"
continuations, so any ASCII word tokenizes without [UNK]; other characters become "<unk>".
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

__all__ = ["TINY_RECOMMENDED", "TINY_MAX_LENGTH", "SPECIAL_TOKENS", "WORDS", "build_tiny_tokenizer", "build_tiny_pipeline",
           "tiny_transformer", "tiny_vae", "tiny_clip", "tiny_t5"]

#: Generation settings the tiny pipeline is meant to be run with (schnell-style: 4 steps, no guidance).
TINY_RECOMMENDED = {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 32}

#: Token length of both tokenizers (CLIP side and T5 side), special tokens included.
TINY_MAX_LENGTH = 32

#: Special tokens, in vocabulary order (ids 0..3). CLIP side: "<s> words </s> <pad>...";
#: T5 side: "words </s> <pad>...".
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3

# Fixed built-in vocabulary (whole words). Chosen from the toy-world grammar and the most frequent
# words of the shipped T2I-CompBench / PartiPrompts prompt sets; order matters (it fixes the ids),
# so only ever append.
WORDS = """
a an the and or of on in at to by with without from into over under above below behind beside
near next between left right top bottom front back side middle center corner inside outside
up down around through while is are was were be has have its it their his her this that some
one two three four five many each other only very
red orange yellow green blue purple pink brown black white gray grey silver gold beige tan
violet cyan magenta teal navy maroon turquoise indigo dark light bright pale colorful
circle square triangle rectangle star heart hexagon oval diamond cross ring dot line stripe
round circular rectangular triangular spherical cubic conical cylindrical pyramidal pentagonal
oblong teardrop crescent cube sphere cone cylinder pyramid block shape
wooden metallic metal glass plastic fabric leather rubber fluffy wood stone brick paper crystal
ceramic steel cotton wool velvet silk shiny soft smooth rough furry
small big large tiny huge tall short long narrow wide old new young empty full hot cold warm
cat dog bird horse cow sheep elephant bear giraffe rabbit frog goat duck dove fish whale snake
mouse squirrel butterfly owl tiger lion monkey panda fox deer zebra pig chicken kitten puppy
car bus train truck boat bicycle bike motorcycle airplane taxi van tire wheel
chair table desk bench sofa couch bed lamp clock vase cup mug bowl plate spoon fork knife bottle
jar box bag backpack suitcase basket pot pan kettle teapot tray shelf bookshelf cabinet drawer
mirror frame picture photo painting drawing sketch book books pencil pen eraser notebook
rug carpet blanket pillow cushion towel curtain door window wall floor roof ceiling stairs
sink toilet bathtub shower faucet refrigerator stove oven toaster microwave counter kitchen
bathroom bedroom office room house building tower bridge street road fence garden park field
apple banana orange lemon pear peach plum grape cherry strawberry watermelon melon mango kiwi
tomato potato carrot cucumber eggplant pepper onion zucchini squash pumpkin corn broccoli
bread cake pizza sandwich cookie donut bagel cheese egg soup coffee tea wine water milk juice
hat shirt jacket dress pants shoes boots gloves scarf sweater coat tie belt sock sunglasses
watch necklace bracelet earring pendant brooch jewelry key keychain wallet phone laptop
computer keyboard screen camera ball balloon toy kite guitar piano drum umbrella candle
tree flower flowers rose tulip sunflower leaf grass bush plant cactus forest mountain hill
river lake pond ocean sea beach sand rock snow ice sky cloud clouds sun moon rain fire
man woman person people boy girl child baby face hand head hair eye
sign light traffic stop board card
sitting standing holding wearing lying flying running jumping playing reading eating looking
parked placed hanging floating
photograph style art portrait cartoon illustration scene view background image
"""

_PUNCTUATION = ".,;:!?'\"-()&/"
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _vocab() -> dict[str, int]:
    """Token -> id: specials, built-in words, punctuation, single chars, then "##" continuations."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for tok in [*WORDS.split(), *_PUNCTUATION, *_CHARS, *("##" + c for c in _CHARS)]:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """Build one of the two tiny tokenizers, deterministically, with the `tokenizers` library.

    kind: "clip" (template "<s> $A </s>", the CLIP side, feeds the pooled vector) or "t5"
    (template "$A </s>", the T5 side, feeds the transformer's text stream). Both share one
    vocabulary (`len(_vocab())` ids), lower-case and strip accents, split on whitespace and
    isolate every character that is not a-z/0-9, truncate to `TINY_MAX_LENGTH` tokens keeping the
    end token, and pad with "<pad>" (id 0). Unknown ASCII words fall back to letters plus
    "##x" continuations; characters outside a-z, 0-9 and the shipped punctuation become "<unk>".

    Returns a `transformers.PreTrainedTokenizerFast` that round-trips through `save_pretrained`.
    Raises ValueError for another kind.
    """
    if kind not in ("clip", "t5"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'clip' or 't5'")
    tok = Tokenizer(models.WordPiece(vocab=_vocab(), unk_token="<unk>", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[^a-z0-9]"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##")
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
        extra = {"bos_token": "<s>"}
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
        extra = {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=TINY_MAX_LENGTH, padding_side="right", truncation_side="right",
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>", **extra)


def tiny_transformer() -> FluxTransformer2DModel:
    """The tiny FluxTransformer2DModel (randomly initialised from the global torch RNG)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=4, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(4, 14, 14))


def tiny_vae() -> AutoencoderKL:
    """The tiny AutoencoderKL. scaling/shift are 1/0: a random VAE has no meaningful latent
    statistics; trained variants (the toy model) register their measured values instead."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


def tiny_clip(vocab_size: int) -> CLIPTextModel:
    """The tiny CLIPTextModel (hidden 64, 2 layers); its pooled output is the first </s>."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_MAX_LENGTH, projection_dim=64,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)  # pooled output = first </s>
    return CLIPTextModel(cfg)


def tiny_t5(vocab_size: int, relative_attention_num_buckets: int = 8) -> T5EncoderModel:
    """The tiny T5EncoderModel (d_model 64, 2 layers, no dropout). The toy model uses 32
    relative-attention buckets (exact offsets up to 8 tokens each way); the random tiny one 8."""
    cfg = T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=relative_attention_num_buckets, relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID)
    return T5EncoderModel(cfg)


def build_tiny_pipeline(seed: int = 0) -> FluxPipeline:
    """Build the tiny FLUX-architecture pipeline from configs (no files, no network).

    Same seed => identical weights => identical images. The global torch RNG state is left as it
    was (weights are drawn inside `torch.random.fork_rng`). Every component is in `.eval()` and
    on the CPU in float32.

    Architecture: FluxTransformer2DModel (in_channels 16, d_model 96 = 3 heads x 32, 4 double-
    stream + 2 single-stream blocks, joint/pooled dim 64, RoPE axes (4, 14, 14), no guidance
    embedding); AutoencoderKL (block_out_channels (16, 32): vae_scale_factor 2, 4 latent
    channels); CLIPTextModel and T5EncoderModel (hidden 64, 2 layers); tokenizers from
    `build_tiny_tokenizer`; FlowMatchEulerDiscreteScheduler(shift 1, no dynamic shifting).
    Run it with `TINY_RECOMMENDED` (32x32, 4 steps, guidance 0, max_sequence_length 32).
    """
    tokenizer, tokenizer_2 = build_tiny_tokenizer("clip"), build_tiny_tokenizer("t5")
    vocab_size = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_transformer()
        vae = tiny_vae()
        text_encoder = tiny_clip(vocab_size)
        text_encoder_2 = tiny_t5(vocab_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
