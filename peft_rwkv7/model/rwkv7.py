"""RWKV-7 "Goose" (x070), readable next to the math in docs/rwkv7.md.

Shapes: B batch, T time, C = n_embd, H heads of N = head_size, V vocab, F = dim_ffn.
Module and parameter names equal the official checkpoint keys, so `state_dict()` *is* the
official layout. The model knows nothing of adapters: it takes an optional initial state per
layer (token-shift vectors and WKV state) and can return the final one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import TokenIdError
from ..ops import linear, matmul, wkv7, wkv7_step
from ..ops.linear_ce import Workspace, linear_cross_entropy
from ..ops.pointwise import relu_square
from ..ops.timemix import bias_sigmoid, key_prep, token_mix, value_residual, wkv_output
from .config import RWKV7Config

LN_EPS = 1e-5
GROUPNORM_EPS = 64e-5  # RWKV-7's ln_x eps (head_size_divisor 8 squared, times 1e-5)
DECAY_FLOOR = 0.5  # w = -softplus(-(...)) - 0.5 <= -0.5, so the decay exp(-exp(w)) is at least exp(-exp(-0.5)) = 0.545


class LayerState(NamedTuple):
    """Recurrent state of one block. Any field may be None (= zeros)."""

    att_shift: torch.Tensor | None  # [B, C] ln1 output of the previous token
    wkv: torch.Tensor | None  # [B, H, N, N] fp32, value-major
    ffn_shift: torch.Tensor | None  # [B, C] ln2 output of the previous token


# token-id dtypes nn.Embedding and the loss's gather take as they are; other integer widths are widened to int64
_ID_DTYPES = (torch.int64, torch.int32)


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str, dims: int = 2, values: bool = True) -> torch.Tensor:
    """`ids` ([B, T] with dims 2, [B] with dims 1) checked at an entry point: a ValueError/TypeError naming `what`
    for a wrong type, shape, dtype or an id outside [0, vocab_size); returned as int64/int32 (other integer
    widths widened). The range (values=True) costs one min/max, on the CPU only: on a GPU it would stall every
    forward on a device sync, and a bad id there stops the run with torch's device-side assert instead."""
    shape = "[B, T] (a batch of sequences)" if dims == 2 else "[B] (one per sequence)"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what}: expected a LongTensor of token ids {shape}, got {type(ids).__name__}")
    if ids.dim() != dims:
        hint = "; add a batch dimension: x[None]" if ids.dim() == dims - 1 else ""
        raise ValueError(f"{what}: expected token ids {shape}, got shape {tuple(ids.shape)}{hint}")
    if ids.dtype not in _ID_DTYPES:
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{what}: expected integer token ids (int64), got {ids.dtype}")
        ids = ids.long()
    if dims == 2 and ids.shape[1] == 0:
        raise ValueError(f"{what}: no tokens (shape {tuple(ids.shape)}); each sequence needs at least one")
    if values and ids.numel() and ids.device.type == "cpu":
        least, most = torch.stack(torch.aminmax(ids)).tolist()
        if least < 0 or most >= vocab_size:
            raise TokenIdError(f"{what}: token ids must be in [0, {vocab_size}) (the model's vocabulary), "
                             f"got {least}..{most}")
    return ids


class Linear(nn.Linear):
    """nn.Linear without bias whose single-row CPU inference (batch-1 generation) takes ops.linear's
    fast matvec. Same parameter, same state-dict key; adapters wrap it like any nn.Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        # bf16 CPU products of a row count in ops.rowsplit's zone made in row chunks (RWKV7.set_bf16_row_chunks)
        self.bf16_row_chunks = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T; with `labels` (x.shape[:-1], -100 = ignored) the per-token NLL of the labels under
        those logits instead, fused and chunked (ops.linear_ce: the logits are never all held; the chunk
        buffers are kept between calls, scratch only)."""
        if labels is not None:
            ws = self.__dict__.get("_ce_workspace")
            if ws is None:
                ws = self.__dict__["_ce_workspace"] = Workspace()
            return linear_cross_entropy(x, self.weight, labels, workspace=ws)
        return linear(x, self.weight, row_chunks=self.bf16_row_chunks)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, cfg.d_decay)), nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.a1, self.a2 = nn.Parameter(torch.zeros(C, cfg.d_aaa)), nn.Parameter(torch.zeros(cfg.d_aaa, C))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, cfg.d_gate)), nn.Parameter(torch.zeros(cfg.d_gate, C))
        self.has_v = layer_id > 0 or cfg.layer0_v
        if self.has_v:
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1, self.v2 = nn.Parameter(torch.zeros(C, cfg.d_mv)), nn.Parameter(torch.zeros(cfg.d_mv, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.output = Linear(C, C)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)
        self.wkv_backend = "auto"

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None, shift: torch.Tensor | None, wkv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, C] (ln1 output); v_first: [B, T, C] or None on layer 0; wkv_state None: this layer's
        time_state where it has one, else zeros. Returns out [B, T, C], v_first, new shift [B, C], new WKV
        state [B, H, N, N] fp32."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        if wkv_state is None and (own := getattr(self, "time_state", None)) is not None:
            # read here, inside this module's call, where DeepSpeed ZeRO-3 has gathered it (not in RWKV7.hidden)
            wkv_state = own.float().unsqueeze(0).expand(B, -1, -1, -1)
        # the token shift: x_i = x + (x_prev - x) * x_i's mix, six at once (ops.timemix)
        mix = torch.cat([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g]).view(6, C)
        xr, xw, xk, xv, xa, xg = token_mix(x, shift, mix)

        # ops.matmul is x @ W, with a fast path for the single rows of batch-1 generation
        r = self.receptance(xr)
        # the decay's pre-activation z; the log-log decay is w = -softplus(-z) - 0.5 = logsigmoid(z) - 0.5
        z = self.w0 + matmul(torch.tanh(matmul(xw, self.w1)), self.w2)
        k0 = self.key(xk)
        v = self.value(xv)
        a = bias_sigmoid(matmul(matmul(xa, self.a1), self.a2), self.a0)  # sigmoid(a0 + ...), one pass each way
        g = matmul(torch.sigmoid(matmul(xg, self.g1)), self.g2)

        # k (1 + (a - 1) k_a), -kk and kk a with kk = k k_k normalised per head
        k, nkk, kka = key_prep(k0, a, self.k_k, self.k_a, H)
        if self.layer_id == 0:
            v_first = v
        else:
            # v + (v_first - v) sigmoid(v0 + ...), one pass each way (ops.timemix)
            v = value_residual(v, v_first, matmul(matmul(xv, self.v1), self.v2), self.v0)

        def heads(t):
            return t.view(B, T, H, N)

        # The six inputs reach the kernel in one dtype: r's, which is bf16 under autocast (the
        # projections' output) while w, a and kk come out of fp32-policy ops. Without this every layer
        # would make fp32 copies of r, k, v for the kernel; RWKV-LM and fla also feed w as bf16.
        dt = r.dtype
        step = T == 1 and not torch.is_grad_enabled()  # an RNN step: no per-call set-up of the sequence op
        # The sequence op takes z where z is in the kernel's dtype already (fp32; bf16 where w0 is stored bf16):
        # the CPU kernel makes the decay from it in one pass, in fp32. Otherwise (an RNN step; an fp32 z under
        # autocast, where w0 is trained) w is made here, in z's dtype, before the cast to the kernel's dtype.
        from_z = not step and z.dtype == dt
        w = z if from_z else F.logsigmoid(z) - DECAY_FLOOR
        args = (*(heads(t).to(dt) for t in (r, w, k, v, nkk, kka)), wkv_state)
        if step:
            y, new_state = wkv7_step(*(t[:, 0] for t in args[:6]), wkv_state)
            y = y.unsqueeze(1)
        else:
            y, new_state = wkv7(*args, backend=self.wkv_backend, **({"decay_offset": DECAY_FLOOR} if from_z else {}))
        # (ln_x(y) + (sum_n r k r_k) v) g per head
        out = wkv_output(y.to(x.dtype).reshape(B, T, C), r, k, v, g, self.ln_x, self.r_k)
        return self.output(out), v_first, x[:, -1], new_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.key = Linear(cfg.n_embd, cfg.dim_ffn)
        self.value = Linear(cfg.dim_ffn, cfg.n_embd)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C] (ln2 output) -> out [B, T, C] and the new shift [B, C]."""
        (k,) = token_mix(x, shift, self.x_k.view(1, -1))
        return self.value(relu_square(self.key(k))), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None, state: LayerState
    ) -> tuple[torch.Tensor, torch.Tensor, LayerState]:
        """x: [B, T, C] residual stream (layer 0: the embeddings, normalised here by ln0) -> (x, v_first
        [B, T, C] from layer 0, this block's new state). A weight is read only inside its own module's call,
        where DeepSpeed ZeRO-3 has gathered it (ln0 here, time_state in TimeMix: not in RWKV7.hidden)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att_out, v_first, att_shift, wkv = self.att(self.ln1(x), v_first, state.att_shift, state.wkv)
        x = x + att_out
        ffn_out, ffn_shift = self.ffn(self.ln2(x), state.ffn_shift)
        return x + ffn_out, v_first, LayerState(att_shift, wkv, ffn_shift)


class RWKV7(nn.Module):
    """idx [B, T] -> logits [B, T, V]; optionally takes and returns per-layer LayerState."""

    def __init__(self, cfg: RWKV7Config, wkv_backend: str = "auto", grad_cp: bool = False):
        if not isinstance(cfg, RWKV7Config):
            raise TypeError(f"RWKV7: expected an RWKV7Config (RWKV7Config.new(n_layer, n_embd, vocab_size, "
                            f"head_size)), got {type(cfg).__name__}")
        super().__init__()
        self.config = cfg
        # zeros, not nn.Embedding's normal_: init_weights sets it (new_model) or a checkpoint does, and normal_ on
        # the meta device (io.model_from_state_dict) imports torch._dynamo: ~1 s of every model load
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.zeros(cfg.vocab_size, cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.head = Linear(cfg.n_embd, cfg.vocab_size)
        self.grad_cp = grad_cp
        self.set_wkv_backend(wkv_backend)

    def set_wkv_backend(self, backend: str) -> None:
        """Which wkv7 backend every layer uses ("auto", "reference", "cpu", "cuda", "triton")."""
        for blk in self.blocks:
            blk.att.wkv_backend = backend

    def set_bf16_row_chunks(self, on: bool) -> None:
        """Whether every Linear (and the LoRA layers wrapping one) makes a bf16 CPU product whose row count lies
        in ops.rowsplit's zone in row chunks: on where precision.cpu_bf16_check measured them faster here."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.bf16_row_chunks = on

    def initial_state(self) -> list[LayerState]:
        """The state a sequence starts from: a checkpoint's `att.time_state` where it has one."""
        return [LayerState(None, getattr(blk.att, "time_state", None), None) for blk in self.blocks]

    @overload
    def forward(
        self, idx: torch.Tensor, state: list[LayerState] | None = None, return_state: Literal[False] = False
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self, idx: torch.Tensor, state: list[LayerState] | None = None, *, return_state: Literal[True]
    ) -> tuple[torch.Tensor, list[LayerState]]: ...

    @overload
    def forward(
        self, idx: torch.Tensor, state: list[LayerState] | None, return_state: Literal[True]
    ) -> tuple[torch.Tensor, list[LayerState]]: ...

    def forward(
        self,
        idx: torch.Tensor,
        state: list[LayerState] | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[LayerState]]:
        """idx: LongTensor [B, T]; state: list of n_layer LayerState (wkv may be [H, N, N],
        broadcast over the batch; None: the layer's initial state, as initial_state() gives). Returns logits
        [B, T, V] (and the final state if asked)."""
        h, new_state = self.hidden(idx, state)
        logits = self.head_logits(h)
        return (logits, new_state) if return_state else logits

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of hidden states h [..., C] (`hidden`'s output): the head, adapted or not. With
        `hidden`, a caller runs the head on the rows it needs only (infer/evaluate.py)."""
        return self.head(h)

    def token_nll(
        self, idx: torch.Tensor, labels: torch.Tensor, state: list[LayerState] | None = None
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """Per-token NLL [B, T] fp32 of labels [B, T] (-100 = not scored, NLL 0) and the final state: the
        same numbers as cross-entropy on forward's logits, through the fused chunked head (the head's
        [B, T, V] logits are never all in memory)."""
        labels = check_labels(labels, idx)
        h, new_state = self.hidden(idx, state)
        if isinstance(self.head, Linear):
            return self.head(h, labels), new_state
        # An adapter wraps the head (method.target_modules: head): its logits, then the NLL.
        logits = self.head(h).float()
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        return nll.view(labels.shape), new_state

    def hidden(
        self, idx: torch.Tensor, state: list[LayerState] | None = None
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """The last block's output after ln_out [B, T, C] (what the head reads) and the final state."""
        idx = check_token_ids(idx, self.config.vocab_size, "idx")
        if self.emb.weight.device.type == "meta" and idx.device.type != "meta":
            raise ValueError("model: its weights are on the meta device (no values); load it (load_model) or "
                             "materialize it (to_empty + weights) before running it")
        B = idx.shape[0]
        if state is None:  # each layer starts from its own time_state, or zeros (TimeMix.forward)
            state = [LayerState(None, None, None)] * len(self.blocks)
        elif len(state) != len(self.blocks) or not all(isinstance(st, LayerState) for st in state):
            got = (f"{len(state)} ({', '.join(sorted({type(st).__name__ for st in state}))})"
                   if isinstance(state, (list, tuple)) else type(state).__name__)
            raise ValueError(f"state: expected a list of {len(self.blocks)} LayerState (one per layer, as "
                             f"return_state=True gives), got {got}")
        x = self.emb(idx)
        v_first = None
        new_state = []
        for blk, st in zip(self.blocks, state):
            if st.wkv is not None and st.wkv.dim() == 3:
                st = st._replace(wkv=st.wkv.float().unsqueeze(0).expand(B, -1, -1, -1))
            if self.grad_cp and torch.is_grad_enabled():
                x, v_first, st = checkpoint(blk, x, v_first, st, use_reentrant=False)
            else:
                x, v_first, st = blk(x, v_first, st)
            new_state.append(st)
        return self.ln_out(x), new_state

    @torch.inference_mode()
    def step(
        self, token: torch.Tensor, state: list[LayerState] | None = None
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """One RNN step for generation. token: LongTensor [B]; returns logits [B, V] and the state."""
        token = check_token_ids(token, self.config.vocab_size, "token", dims=1, values=False)  # values: in hidden
        logits, state = self.forward(token[:, None], state, return_state=True)
        return logits[:, -1], state


def check_labels(labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """labels of token_nll: a tensor of idx's shape [B, T], integer (int64; other widths widened). Their values are
    checked where the NLL is taken (ops.linear_ce)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a LongTensor [B, T] (-100 = not scored), got {type(labels).__name__}")
    if isinstance(idx, torch.Tensor) and labels.shape != idx.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} differs from idx's {tuple(idx.shape)}; labels[b, t] "
                         "is the token after idx[b, t] (idx = ids[:, :-1], labels = ids[:, 1:])")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected integer token ids (int64, -100 = not scored), got {labels.dtype}")
    return labels if labels.dtype == torch.int64 else labels.long()
