"""Tiny random-weight diffusion models, built here and saved as diffusers directories.

Nothing is downloaded: every weight is random (seeded), the tokenizer's vocabulary is the
byte alphabet written here, and the models are small enough to run on the CPU in tenths
of a second. Used by the diffusion provider's tests (they need the ``diffusion`` extra).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE maps bytes to (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges): every prompt encodes."""
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def stable_diffusion(directory: Path) -> Path:
    """A tiny Stable Diffusion 1.x-class model (UNet, VAE, CLIP text encoder) at ``directory``."""
    torch.manual_seed(0)
    tok = tokenizer()
    vocab = tok.get_vocab()
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            projection_dim=16,
            max_position_embeddings=16,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory


def stable_video_diffusion(directory: Path) -> Path:
    """A tiny Stable Video Diffusion-class image-to-video model at ``directory``."""
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16,
        num_attention_heads=(2, 2),
        projection_class_embeddings_input_dim=3 * 8,
        addition_time_embed_dim=8,
        transformer_layers_per_block=1,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
    )
    # The pipeline resizes its conditioning image to 224 x 224 for the image encoder.
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            projection_dim=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            intermediate_size=32,
            patch_size=32,
        )
    )
    features = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler, feature_extractor=features
    ).save_pretrained(directory)
    return directory


def lora(model: Path, seed: int = 7) -> bytes:
    """Random LoRA weights (safetensors) for the tiny model's UNet attention layers."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,  # random both ways: the adapter changes the output
        )
    )
    layers = get_peft_model_state_dict(unet)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers)
        return (Path(tmp) / "pytorch_lora_weights.safetensors").read_bytes()


def registry(
    path: Path, image_model: Path, video_model: Path, *, device: str = "auto", dtype: str = "auto"
) -> Path:
    """A model registry file serving every diffusion task type with the tiny models."""
    placed = [f'device = "{device}"', f'dtype = "{dtype}"']
    lines = [
        "[models.tiny-sd]",
        'pipeline = "StableDiffusionPipeline"',
        f'path = "{image_model}"',
        "steps = 4",
        "guidance = 5.0",
        *placed,
        "[models.tiny-svd]",
        'pipeline = "StableVideoDiffusionPipeline"',
        f'path = "{video_model}"',
        "steps = 2",
        "guidance = 2.0",
        *placed,
        "[tasks]",
        *(
            f'{task} = "tiny-sd"'
            for task in (
                "GENERATION",
                "EDITING",
                "DETAIL_ENHANCER",
                "REFINE",
                "BACKGROUND_FIX",
                "FACE_ENHANCER",
            )
        ),
        'VIDEO_GENERATION = "tiny-svd"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
