"""Analytic FLOPs of a MAGI-1 run (spec/magi1.md §6): every chunk pass it makes, with its key count."""

from __future__ import annotations


def pass_flops(mcfg, ctn: int, keys: int, caption_tokens: int) -> dict[str, float]:
    from flowcache_jax.flops import transformer_pass_flops

    return transformer_pass_flops(mcfg.hidden_size, mcfg.num_attention_heads * mcfg.kv_channels,
                                  mcfg.num_query_groups * mcfg.kv_channels, mcfg.ffn_hidden_size, mcfg.num_layers,
                                  ctn, keys, caption_tokens, mcfg.gated_linear_unit)


def count_passes(table, den, decisions, chunks, ks, reencode: bool, ts) -> list[tuple[str, int]]:
    """(kind, key chunks) of every chunk pass a run makes: computed chunks, duplicates, history guidance's chunk-alone
    passes (``ts``: each slot's time), clean re-encodes."""
    out = []
    guided = den.history_scale != 1.0
    steps_k = len(den.noise2clean_kvrange)
    dup_k = den.nearly_clean_k if not den.discard_duplicate and den.nearly_clean_k is not None else None
    for g in range(decisions.shape[0]):
        for j in range(decisions.shape[1]):
            c = int(chunks[g, j])
            if c < 0 or decisions[g, j] != 1:
                continue
            n_keys = c + 1 if not steps_k else min(c + 1, den.noise2clean_kvrange[min(ks[g, j] // den.steps_per_stage,
                                                                                          steps_k - 1)])
            out.append(("noisy", n_keys))
            if guided and ts[g, j] <= den.history_t_max:
                out.append(("history_alone", 1))
            elif j == 0 and dup_k is not None and ks[g, j] >= dup_k:
                out.append(("duplicate", 1))
    if reencode:
        for s in range(1, table.num_stages):
            for c in table.finish[s - 1][table.finish[s - 1] >= 0]:
                out.append(("clean", int(c) + 1 if not steps_k else den.clean_chunk_kvrange))
    return out


def run_flops(run, res=None) -> dict:
    """FLOPs of a MAGI run: with ``res`` its computed chunks, else the uncached schedule."""
    import numpy as np

    t, den = run.table, run.denoiser
    valid = t.step_valid.reshape(-1)
    chunks = t.chunk.reshape(-1, t.window)[valid]
    ks = t.k.reshape(-1, t.window)[valid]
    ts = t.t.reshape(-1, t.window)[valid]
    dec = np.where(chunks >= 0, 1, -1) if res is None else res.decisions
    passes = count_passes(t, den, dec, chunks, ks, run.sampler.reencode_clean, ts)
    ctn = den.tokens_per_chunk
    cap = int(np.asarray(run.cond["mask"]).sum(-1).mean()) if run.cond is not None else 0
    total = {"linear": 0.0, "attention": 0.0, "cross_attention": 0.0, "total": 0.0}
    kinds: dict[str, int] = {}
    for kind, n_keys in passes:
        f = pass_flops(den.cfg, ctn, n_keys * ctn, cap)
        kinds[kind] = kinds.get(kind, 0) + 1
        for k in total:
            total[k] += f[k]
    return {"chunk_passes": kinds, "flops": total, "total_pflops": total["total"] / 1e15,
            "pflops_without_cross_attention": (total["linear"] + total["attention"]) / 1e15}
