"""The PyTorch reference for `dpo_jax.bench --torch`: the official Diffusion-DPO train step on
diffusers' UNet2DConditionModel, timed in the same process as the JAX step.

The step follows SalesforceAIResearch/DiffusionDPO's train.py (`--train_method dpo`): winners
first then losers in one batch of 2B images, one noise draw and one timestep per pair shared by
its two images, the policy's forward and backward on all 2B, the frozen reference's forward on
the same 2B under no_grad, the loss

  −log σ(−½β · ((mse_w − ref_mse_w) − (mse_l − ref_mse_l)))

with per-image MSEs over C, H, W (`official_dpo_loss`; dpo_jax/loss.py is the same formula),
gradient clipping and an AdamW step. Batches are random latents and text embeddings, as the JAX
bench's latent-cache batches: no encoder runs.

Imports torch and diffusers at import time: `dpo_jax.bench` imports this module only for
--torch, so the JAX bench never needs PyTorch.
"""
import copy
import gc
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from dpo_jax import diffusion

# train.py's SDXL time ids are (R, R, 0, 0, R, R) for R the pixel resolution; latents are 1/8.
_VAE_DOWNSCALE = 8


def official_dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                      beta: float) -> torch.Tensor:
  """train.py's DPO loss on [2B, C, H, W] predictions, winners first then losers.

  The MSEs are taken in float32 (train.py takes them in the prediction's dtype): bfloat16
  sums lose digits, and dpo_jax.loss.per_sample_error does the same.
  """
  target = target.float()
  model_losses = (model_pred.float() - target).pow(2).mean(dim=[1, 2, 3])
  model_losses_w, model_losses_l = model_losses.chunk(2)
  model_diff = model_losses_w - model_losses_l
  with torch.no_grad():
    ref_losses = (ref_pred.detach().float() - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
  inside_term = -0.5 * beta * (model_diff - ref_diff)
  return -F.logsigmoid(inside_term).mean()


def _sync(device: torch.device) -> None:
  # CUDA kernels run asynchronously: a clock read without a sync times the launches only.
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def torch_bench(unet_config: dict, *, pairs: int, latent_size: int, context_length: int,
                context_width: int, pooled_width: int | None, beta: float, lr: float,
                weight_decay: float, grad_clip: float, bf16: bool, steps: int, warmup: int,
                seed: int, gradient_checkpointing: bool = False) -> dict:
  """Times `steps` official Diffusion-DPO train steps after `warmup` untimed ones.

  Args:
    unet_config: a diffusers unet/config.json dict (the JAX bench's `unet_config`).
    pairs: B, pairs per step (2B images).
    latent_size: latents are [2B, 4, latent_size, latent_size] (in_channels of the config).
    context_length, context_width: the text embeddings' shape per prompt (77 × width).
    pooled_width: SDXL's pooled text embedding width, for `addition_embed_type='text_time'`
      UNets (added conditions: text_embeds and 6 time ids); None for SD 1.x/2.x shapes.
    beta: β in the paper's convention (½ inside the sigmoid), as dpo.beta.
    lr, weight_decay, grad_clip: torch.optim.AdamW's and clip_grad_norm_'s.
    bf16: the UNets run under torch.autocast(bfloat16) with float32 master weights (the
      official code's mixed precision); the reference is held in bfloat16 as train.py's
      `ref_unet.to(dtype=weight_dtype)`. Otherwise everything is float32.
    gradient_checkpointing: the policy recomputes activations in its backward pass
      (train.py --gradient_checkpointing, the JAX bench's model.remat).
  Returns:
    torch_* keys: rates, the first and last steps' losses, device and peak memory.
  """
  try:
    return _run(**locals())  # Its frame, with the models and optimiser state, ends here,
  finally:
    gc.collect()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()  # so the GPU memory goes back before JAX reserves most of it.


def _run(unet_config: dict, *, pairs: int, latent_size: int, context_length: int,
         context_width: int, pooled_width: int | None, beta: float, lr: float,
         weight_decay: float, grad_clip: float, bf16: bool, steps: int, warmup: int,
         seed: int, gradient_checkpointing: bool) -> dict:
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  with torch.random.fork_rng(devices=[]):  # Seeds the init without touching the caller's RNG.
    torch.manual_seed(seed)
    # from_config, not UNet2DConditionModel(**config): it skips keys a newer config.json has.
    policy = UNet2DConditionModel.from_config(unet_config)
  if gradient_checkpointing:
    policy.enable_gradient_checkpointing()
  policy = policy.to(device).train()
  reference = copy.deepcopy(policy).requires_grad_(False).eval()
  if bf16:
    # Module.bfloat16, not ModelMixin.to, which warns about a from_pretrained-only option.
    reference = reference.bfloat16()
  optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
  scheduler = DDPMScheduler.from_config(diffusion.DEFAULT_SCHEDULER)

  generator = torch.Generator(device).manual_seed(seed)
  randn = lambda *shape: torch.randn(shape, generator=generator, device=device)
  channels = policy.config.in_channels

  def batch():
    """A pair batch as train.py feeds the UNets: winners then losers, the prompt's embeddings
    repeated for both images of a pair."""
    inputs = {"latents": randn(2 * pairs, channels, latent_size, latent_size),
              "context": randn(pairs, context_length, context_width).repeat(2, 1, 1)}
    if pooled_width is not None:
      resolution = latent_size * _VAE_DOWNSCALE
      time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution],
                              dtype=torch.float32, device=device)
      inputs["added"] = {"text_embeds": randn(pairs, pooled_width).repeat(2, 1),
                         "time_ids": time_ids.repeat(2 * pairs, 1)}
    return inputs

  batches = [batch() for _ in range(2)]  # Two, alternated, as the JAX bench.
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

  def step(inputs) -> torch.Tensor:
    latents = inputs["latents"]
    # One noise draw and one timestep per pair, shared by winner and loser (train.py draws
    # 2B and keeps the first half: the same distribution).
    noise = randn(pairs, *latents.shape[1:]).repeat(2, 1, 1, 1)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,),
                              generator=generator, device=device).repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    args = (noisy, timesteps, inputs["context"])
    added = inputs.get("added")
    with autocast:
      model_pred = policy(*args, added_cond_kwargs=added).sample
      with torch.no_grad():
        ref_pred = reference(*args, added_cond_kwargs=added).sample
      loss = official_dpo_loss(model_pred, ref_pred, noise, beta)  # ε-prediction: target ε.
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  first_loss = None
  for i in range(warmup):
    loss = step(batches[i % 2])
    first_loss = loss if first_loss is None else first_loss
  _sync(device)
  started = time.perf_counter()
  for i in range(steps):
    loss = step(batches[(warmup + i) % 2])
    first_loss = loss if first_loss is None else first_loss
  _sync(device)
  step_seconds = (time.perf_counter() - started) / steps

  return {
      "torch_pairs_per_sec": pairs / step_seconds, "torch_step_seconds": step_seconds,
      "torch_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "torch_dtype": "bfloat16" if bf16 else "float32",
      "torch_first_loss": float(first_loss), "torch_final_loss": float(loss),
      "torch_peak_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                           else None),
      "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
  }
