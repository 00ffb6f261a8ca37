"""The CPU demo: a tiny random UNet learns a synthetic latent preference (the default config)."""
from dpo_jax.default_config import get_config  # noqa: F401  (config_flags calls get_config)
