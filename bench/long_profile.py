"""Long pairs: where sdpo's memory goes at one length (issue 16; docs/performance.md "Long pairs: where the memory
goes at 4K").

    python -m bench.long_profile                       # 4K, no gradient checkpointing (needs runs/bench-long/L4096)
    python -m bench.long_profile --gc                  # the same with gradient checkpointing
    python -m bench.long_profile --mask                # the prefix attention as an explicit L x L mask (pre issue 16)
    python -m bench.long_profile --length 8192 --torch-profiler

Uses bench.long's model and pairs (make bench-long, or `python -m bench.long --worker prep --lengths L`) and replays
what `sdpo run` does with them in ONE process, stage by stage, with sdpo_cli's own pieces (read-only use, nothing
patched): the tokenizer as sdpo loads it, `resolve_layout` (the prefix attention as causal pieces, or with --mask an
explicit mask), `collate_pairs(..., "prefix")`, `completion_logps` (decoder body + chunked LM head), the DPO loss
(sdpo_cli.loss.dpo_losses), fused AdamW with clipping, one pair per update, 2 updates, and the reference pass
before it (batch 1, no grad, as reflogp with inference.batch_size=1). Not replayed: the split (datasets,
arrow files), fingerprints, integrity hashing, accelerate, the checkpoint save and the loss plot.

Figures:
- RSS (/proc/self/statm, sampled every 2 ms by a thread) at each stage's start and its peak inside the stage;
- exact tensor bytes: weights, gradients, AdamW states (after the first step);
- activations saved for backward, by module (torch.autograd.graph.saved_tensors_hooks; a storage is counted once,
  at the module that saved it first; parameters are left out). Under gradient checkpointing the checkpointed blocks
  install their own hooks, so what they keep is counted from the blocks' inputs instead (see the output);
- with --torch-profiler: torch.profiler(profile_memory=True) over update 2's forward + backward, the ops that
  allocate the most.
Prints a table and writes WORKDIR/profile-L{length}[-gc][-mask].json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.common import BETA, LR, ROOT

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


class Rss:
    """The process's RSS, sampled from a thread: `mark(name)` starts a stage; `stages` holds each stage's RSS at its
    start and end and its peak."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self.stages, self._name, self._start = period, 0, [], None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.now())

    def mark(self, name: str | None) -> None:
        now = self.now()
        if self._name is not None:
            self.stages.append({"stage": self._name, "start_mb": self._start / MB, "end_mb": now / MB,
                                "peak_mb": max(self.peak, now) / MB})
        self._name, self._start, self.peak = name, now, now

    def close(self) -> None:
        self.mark(None)
        self._stop.set()


def category(name: str) -> str:
    """A module name -> the kind of activation it saves."""
    if name == "":
        return "LM head / log-probs / loss (outside the decoder's modules)"
    parts = name.split(".")
    if "layers" in parts:
        leaf = parts[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return f"attention: {leaf} input"
        if leaf == "self_attn":
            return "attention: rope + sdpa (q, k, v, out, stats)"
        if leaf in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            return f"MLP: {leaf} input"
        if leaf == "mlp":
            return "MLP: product (act(gate) * up)"
        if leaf.endswith("layernorm"):
            return "norms (RMSNorm, 2 per layer)"
        return f"layer: {leaf}"
    if parts[-1] == "norm":
        return "final norm"
    if parts[-1] == "embed_tokens":
        return "embeddings"
    if parts[-1] == "rotary_emb":
        return "rotary cos/sin"
    return f"other: {name}"


class Saved:
    """Bytes saved for backward by module (a storage counted once), via saved_tensors_hooks."""

    def __init__(self, model):
        self.stack: list[str] = []
        self.bytes: dict[str, int] = defaultdict(int)
        self.by_layer: dict[str, int] = defaultdict(int)
        self.seen: set[int] = set()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.handles = []
        def enter(name):
            def hook(module, args):
                self.stack.append(name)
            return hook

        def leave(module, args, output):
            self.stack.pop()

        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(enter(name)))
            self.handles.append(mod.register_forward_hook(leave))

    def pack(self, t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.seen and ptr not in self.params and ptr != 0:
                self.seen.add(ptr)
                name = self.stack[-1] if self.stack else ""
                self.bytes[category(name)] += st.nbytes()
                parts = name.split(".")
                if "layers" in parts:
                    self.by_layer["layer " + parts[parts.index("layers") + 1]] += st.nbytes()
        except Exception:  # noqa: BLE001 - a tensor without storage (sparse, nested): not counted
            pass
        return t

    @staticmethod
    def unpack(t):
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (train.gradient_checkpointing=true)")
    ap.add_argument("--torch-profiler", action="store_true", help="also profile update 2 with torch.profiler")
    ap.add_argument("--mask", action="store_true", help="runtime.prefix_attention=mask (default: pieces)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench-long"))
    a = ap.parse_args()
    work = Path(a.workdir)
    rss = Rss()
    rss.mark("imports (python, torch, transformers, sdpo_cli)")
    import torch
    import torch.nn.functional as F  # noqa: F401
    import transformers  # noqa: F401

    from sdpo_cli.collate import collate_pairs, prefix_mask, resolve_layout
    from sdpo_cli.logprobs import completion_logps
    from sdpo_cli.loss import dpo_losses

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rss.mark("tokenizer + data")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(work / "model"))
    rows = json.loads((work / f"L{a.length}" / "rows.json").read_text())
    retok = [tok(r["prompt"] + r["chosen"] + tok.eos_token)["input_ids"] for r in rows]  # what tokenising costs
    assert all(len(x) == len(r["prompt_ids"]) + len(r["chosen_ids"]) for x, r in zip(retok, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
    rss.mark("model load (weights)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head = model.get_output_embeddings().weight
    resolve_layout("prefix", model, prefix_attention="mask" if a.mask else "pieces")
    out = {"length": a.length, "gc": a.gc, "prefix_attention": "mask" if a.mask else "pieces", "params": n_params,
           "weights_mb": weights / MB,
           "head_mb": head.numel() * head.element_size() / MB,
           "row_tokens": [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]}

    rss.mark("reference pass (no grad, batch 1)")
    model.eval()
    with torch.no_grad():
        ref = [completion_logps(model, collate_pairs([r], pad, "prefix")) for r in rows]
    rss.mark("between reference pass and training")
    model.train()
    if a.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    batch_mask_mb = None
    for update, (r, (rc, rr)) in enumerate(zip(rows, ref)):
        batch = collate_pairs([r], pad, "prefix")
        if a.mask:  # built inside completion_logps; its size, from a copy
            batch_mask_mb = prefix_mask(batch).numel() / MB
        prof = None
        if a.torch_profiler and update == 1:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
            prof.__enter__()
        rss.mark(f"update {update + 1}: forward (policy, with autograd)")
        saved = Saved(model) if update == 0 else None
        if saved is not None:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                pc, pr = completion_logps(model, batch)
            saved.remove()
        else:
            pc, pr = completion_logps(model, batch)
        loss = dpo_losses(pc, pr, rc, rr, beta=BETA).mean()
        rss.mark(f"update {update + 1}: backward")
        loss.backward()
        if prof is not None:
            prof.__exit__(None, None, None)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        rss.mark(f"update {update + 1}: clip + AdamW step")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adam = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v))
        del loss, pc, pr, batch
        if saved is not None:
            out["saved_for_backward_mb"] = {k: v / MB for k, v in sorted(saved.bytes.items(), key=lambda x: -x[1])}
            out["saved_by_layer_mb"] = {k: v / MB for k, v in saved.by_layer.items()}
        out["grads_mb"], out["adam_mb"] = grads / MB, adam / MB
        if prof is not None:
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_memory_usage)[:20]
            out["profiler_top_self_alloc_mb"] = [{"op": e.key, "self_alloc_mb": e.self_cpu_memory_usage / MB,
                                                  "calls": e.count} for e in ev]
    rss.mark("after training")
    rss.close()
    out["mask_mb"] = batch_mask_mb
    out["stages"] = rss.stages
    import resource

    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = work / f"profile-L{a.length}{'-gc' if a.gc else ''}{'-mask' if a.mask else ''}.json"
    path.write_text(json.dumps(out, indent=1))

    print(f"L={a.length} (prefix rows of {out['row_tokens']} tokens), gradient checkpointing {a.gc}, "
          f"prefix attention {out['prefix_attention']}, "
          f"{n_params / 1e6:.1f}M params")
    print(f"  weights {out['weights_mb']:.0f} MB (LM head {out['head_mb']:.0f}), grads {out['grads_mb']:.0f} MB, "
          f"AdamW states {out['adam_mb']:.0f} MB, prefix mask "
          + (f"{out['mask_mb']:.0f} MB" if out["mask_mb"] is not None else "none (causal pieces)"))
    print("  stage                                              start      end     peak   (RSS, MB)")
    for s in rss.stages:
        print(f"  {s['stage']:<48} {s['start_mb']:8.0f} {s['end_mb']:8.0f} {s['peak_mb']:8.0f}")
    if "saved_for_backward_mb" in out:
        total = sum(out["saved_for_backward_mb"].values())
        print(f"  saved for backward (update 1): {total:.0f} MB")
        for k, v in out["saved_for_backward_mb"].items():
            print(f"    {k:<58} {v:8.1f} MB")
        print("    per layer: " + ", ".join(f"{k} {v:.0f}" for k, v in out["saved_by_layer_mb"].items()))
    for e in out.get("profiler_top_self_alloc_mb", []):
        print(f"    profiler: {e['op']:<50} {e['self_alloc_mb']:9.1f} MB over {e['calls']} calls")
    print(f"  ru_maxrss {out['ru_maxrss_mb']:.0f} MB; written {path}")


if __name__ == "__main__":
    time.perf_counter()
    main()
