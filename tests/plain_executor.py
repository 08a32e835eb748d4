"""An independent, straightforward plan executor (test code only).

In the style of the reference implementation's ``dynamic_flux.py``: the transformer's
``forward`` is replaced by a plain loop over the model's own blocks, written out from the
diffusers block code, that applies the plan's flags directly. It counts calls to know the
step, keeps every computed output (no liveness analysis, no hooks) and shares nothing with
``invardiff.runtime``, so the runtime's output can be compared with it bit for bit.

Rules (ALGORITHM.md §7): on a step whose gate is set, H of the last computed step is reused
and no block runs; otherwise a module output is reused when its flag is set and an output is
cached; FLUX's joint attention is reused only when both ``attn`` and ``context_attn`` are
flagged. Norms, adaLN and residual adds always run with the current conditioning.

Extrapolation (docs/step-reuse.md), in x = the step index (rules "linear") or the timestep the
transformer is called with (rules "...-t", read from ``timesteps``, default the plan's): under
``step_reuse="linear"`` a skipped step i gets H_a + (H_a - H_b) * (x_i - x_a) / (x_a - x_b)
from the last two computed steps b < a, under "quadratic-t" the parabola through the last
three, each with as many computed steps as there are (one: H_a). ``module_reuse`` does the
same for a reused module's output from the module's own computed outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput


class PlainExecutor:
    """``with PlainExecutor(transformer, plan): pipe(...)`` for one generation.

    ``calls_per_step``: transformer calls per step (2 for CFG as two calls, one cache each);
    ``first_step``: the step of the first call (img2img starts mid-schedule).
    """

    def __init__(self, transformer, plan, calls_per_step: int = 1, first_step: int = 0, timesteps=None) -> None:
        self.transformer = transformer
        self.plan = plan
        self.timesteps = list((plan.target.timesteps if timesteps is None else timesteps) or ())
        self.calls_per_step = calls_per_step
        self.first_step = first_step
        self.calls = 0
        self.caches: list[dict] = [{} for _ in range(calls_per_step)]
        self.reused: list[tuple[int, str, int]] = []  # (step, kind, layer) of every reuse

    def __enter__(self) -> PlainExecutor:  # noqa: PYI034
        self.transformer.forward = self.forward
        return self

    def __exit__(self, *exc) -> None:
        del self.transformer.forward

    @property
    def steps_run(self) -> int:
        return self.calls // self.calls_per_step

    def forward(self, *args, **kwargs):
        step, branch = divmod(self.calls, self.calls_per_step)
        step += self.first_step
        self.calls += 1
        if self.timesteps:  # the schedule it extrapolates in is the one the transformer is called with
            called = float(kwargs["timestep"].reshape(-1)[0])
            assert abs(called - self.timesteps[step]) <= 1e-5 * abs(self.timesteps[step]), (called, step)
        run = _dit_forward if self.plan.arch == "dit" else _flux_forward
        return run(self, step, self.caches[branch], *args, **kwargs)

    def reuse_or(self, cache: dict, step: int, key: tuple[str, int], flagged: bool, compute):
        """The output of ``key`` under ``module_reuse`` if flagged and computed before, else a
        fresh one (then kept)."""
        if flagged and key in cache:
            self.reused.append((step, *key))
            return self.at(self.plan.module_reuse, step, cache[key])
        output = compute()
        cache.setdefault(key, []).append((step, output))
        return output

    def x(self, rule: str, step: int) -> float:
        return float(self.timesteps[step]) if rule.endswith("-t") else float(step)

    def at(self, rule: str, step: int, computed: list):
        """The value at ``step`` from the computed (step, value) list under ``rule``."""
        if isinstance(computed[-1][1], tuple):  # FLUX joint attention: each half on its own
            halves = len(computed[-1][1])
            return tuple(self.at(rule, step, [(s, v[k]) for s, v in computed]) for k in range(halves))
        last_step, last = computed[-1]
        order = {"hold": 0, "linear": 1, "linear-t": 1, "quadratic-t": 2}[rule]
        if order == 0 or len(computed) == 1:
            return last
        x, xa = self.x(rule, step), self.x(rule, last_step)
        before_step, before = computed[-2]
        xb = self.x(rule, before_step)
        if order == 1 or len(computed) == 2:
            return last + (last - before) * ((x - xa) / (xa - xb))
        oldest_step, oldest = computed[-3]
        xc = self.x(rule, oldest_step)
        return (last * ((x - xb) * (x - xc) / ((xa - xb) * (xa - xc)))
                + before * ((x - xa) * (x - xc) / ((xb - xa) * (xb - xc)))
                + oldest * ((x - xa) * (x - xb) / ((xc - xa) * (xc - xb))))  # fmt: skip

    def flag(self, kind: str, step: int, layer: int) -> bool:
        return bool(self.plan.modules[kind][step, layer]) or bool(self.plan.step_gate[step])

    def skips(self, cache: dict, step: int) -> bool:
        return bool(self.plan.step_gate[step]) and "hidden" in cache

    def computed_hidden(self, cache: dict, step: int, hidden) -> None:
        """Remember H of a computed step (every one, oldest first)."""
        cache.setdefault("hidden", []).append((step, hidden))

    def skipped_hidden(self, cache: dict, step: int):
        """H of a skipped step under the plan's ``step_reuse`` rule."""
        return self.at(self.plan.step_reuse, step, cache["hidden"])


# ---- DiT (DiTTransformer2DModel, ada_norm_zero blocks) ------------------------------------
def _dit_forward(ex, step, cache, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                 return_dict=True):  # fmt: skip
    t = ex.transformer
    x = t.pos_embed(hidden_states)
    if ex.skips(cache, step):
        x = ex.skipped_hidden(cache, step)
    else:
        for layer, block in enumerate(t.transformer_blocks):
            x = _dit_block(ex, step, cache, layer, block, x, timestep, class_labels)
        ex.computed_hidden(cache, step, x)
    conditioning = t.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
    shift, scale = t.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    x = t.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
    x = t.proj_out_2(x)
    p, c = t.patch_size, t.out_channels
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(shape=(-1, side, side, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    out = x.reshape(shape=(-1, c, side * p, side * p))
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _dit_block(ex, step, cache, layer, block, x, timestep, class_labels):
    assert block.attn2 is None and block.pos_embed is None and block._chunk_size is None
    norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
    attn = ex.reuse_or(cache, step, ("attn", layer), ex.flag("attn", step, layer),
                       lambda: block.attn1(norm, encoder_hidden_states=None, attention_mask=None))  # fmt: skip
    x = gate_msa.unsqueeze(1) * attn + x
    if x.ndim == 4:
        x = x.squeeze(1)
    norm = block.norm3(x)
    norm = norm * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff = ex.reuse_or(cache, step, ("mlp", layer), ex.flag("mlp", step, layer), lambda: block.ff(norm))
    x = gate_mlp.unsqueeze(1) * ff + x
    if x.ndim == 4:
        x = x.squeeze(1)
    return x


# ---- FLUX (FluxTransformer2DModel: double-stream then single-stream blocks) ---------------
def _flux_forward(ex, step, cache, hidden_states, encoder_hidden_states=None, pooled_projections=None,
                  timestep=None, img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None,
                  return_dict=True, **unused):  # fmt: skip
    t = ex.transformer
    x = t.x_embedder(hidden_states)
    timestep = timestep.to(x.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(x.dtype) * 1000
        temb = t.time_text_embed(timestep, guidance, pooled_projections)
    else:
        temb = t.time_text_embed(timestep, pooled_projections)
    ctx = t.context_embedder(encoder_hidden_states)
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rope = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    if ex.skips(cache, step):
        x = ex.skipped_hidden(cache, step)
    else:
        for layer, block in enumerate(t.transformer_blocks):
            ctx, x = _flux_double(ex, step, cache, layer, block, x, ctx, temb, rope)
        for layer, block in enumerate(t.single_transformer_blocks):
            ctx, x = _flux_single(ex, step, cache, layer, block, x, ctx, temb, rope)
        ex.computed_hidden(cache, step, x)
    out = t.proj_out(t.norm_out(x, temb))
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _flux_double(ex, step, cache, layer, block, x, ctx, temb, rope):
    norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(ctx, emb=temb)
    joint = ex.flag("attn", step, layer) and ex.flag("context_attn", step, layer)  # one call, both halves
    attn, ctx_attn = ex.reuse_or(cache, step, ("joint_attn", layer), joint,
                                 lambda: block.attn(hidden_states=norm_x, encoder_hidden_states=norm_c,
                                                    image_rotary_emb=rope))  # fmt: skip
    x = x + gate_msa.unsqueeze(1) * attn
    norm_x = block.norm2(x)
    norm_x = norm_x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff = ex.reuse_or(cache, step, ("ff", layer), ex.flag("ff", step, layer), lambda: block.ff(norm_x))
    x = x + gate_mlp.unsqueeze(1) * ff
    ctx = ctx + c_gate_msa.unsqueeze(1) * ctx_attn
    norm_c = block.norm2_context(ctx)
    norm_c = norm_c * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context_ff = ex.reuse_or(cache, step, ("context_ff", layer), ex.flag("context_ff", step, layer),
                             lambda: block.ff_context(norm_c))  # fmt: skip
    ctx = ctx + c_gate_mlp.unsqueeze(1) * context_ff
    if ctx.dtype == torch.float16:
        ctx = ctx.clip(-65504, 65504)
    return ctx, x


def _flux_single(ex, step, cache, layer, block, x, ctx, temb, rope):
    text_tokens = ctx.shape[1]
    h = torch.cat([ctx, x], dim=1)
    residual = h
    norm, gate = block.norm(h, emb=temb)
    mlp = ex.reuse_or(cache, step, ("single_mlp", layer), ex.flag("single_mlp", step, layer),
                      lambda: block.act_mlp(block.proj_mlp(norm)))  # fmt: skip
    attn = ex.reuse_or(cache, step, ("single_attn", layer), ex.flag("single_attn", step, layer),
                       lambda: block.attn(hidden_states=norm, image_rotary_emb=rope))  # fmt: skip
    h = torch.cat([attn, mlp], dim=2)
    h = residual + gate.unsqueeze(1) * block.proj_out(h)
    if h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    return h[:, :text_tokens], h[:, text_tokens:]
