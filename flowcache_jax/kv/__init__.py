"""KV cache: importance-redundancy compression (``compress``); the fixed-shape buffer comes next."""
