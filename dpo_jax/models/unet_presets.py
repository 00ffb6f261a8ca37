"""The published unet/config.json of the Stable Diffusion releases we target.

Used to build full-size models abstractly (parameter counts, FLOP counts, memory planning,
random-init benchmarks) without downloading a checkpoint.
"""
_SD1_SD2_COMMON = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)

SD15 = dict(_SD1_SD2_COMMON, sample_size=64, cross_attention_dim=768, attention_head_dim=8)

SD21 = dict(_SD1_SD2_COMMON, sample_size=96, cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True)

SDXL_BASE = dict(
    in_channels=4, out_channels=4, sample_size=128, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0)

PRESETS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL_BASE}
