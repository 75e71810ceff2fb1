"""flowcache-jax: chunkwise adaptive reuse and KV compression for autoregressive video diffusion."""
