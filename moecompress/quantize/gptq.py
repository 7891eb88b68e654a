"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Columns are quantized one at a time; the error of each is spread over the columns not yet quantized through the
upper Cholesky factor U of the inverse Hessian (H^-1 = U^T U), so that the layer output error
trace((W - Q) H (W - Q)^T) stays small. Updates inside a block of columns are applied at once, those to later
columns lazily at the block's end. All math in float32; the result is stored in the same group-wise format as RTN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.errors import MoecompressError
from moecompress.format.pack import dequantize_values
from moecompress.artifacts.quantized import QuantizedWeight
from moecompress.quantize.rtn import check_quant_args, group_params, quantize_rtn, quantize_values


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    fallback: str | None  # why plain RTN was used instead of GPTQ; None when GPTQ ran
    loss: float  # layer_output_error(w, dequantized weight, hessian); nan when the hessian is not finite


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Ŵ) H (W - Ŵ)^T) for W, Ŵ [out, in] and H [in, in]: with H = X^T X, the squared error of X W^T."""
    d = w.to(torch.float32) - w_hat.to(device=w.device, dtype=torch.float32)  # [out, in]
    h = hessian.to(device=w.device, dtype=torch.float32)
    return float(((d @ h) * d).sum())


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip: str = "minmax",
) -> GPTQResult:
    """GPTQ of w [out, in] under hessian [in, in] (e.g. X^T X of the calibration inputs), group-wise like RTN.

    Damping adds damp * mean(diag H) to the diagonal (retried once with 10x). Inputs never seen (diag H = 0) get
    a unit diagonal and their weights are set to 0 before quantizing: with no calibration signal, 0 is what
    GPTQ assumes they contribute. act_order processes columns by descending diag(H) with static groups (all group
    parameters from the original weights, up front), so the stored format is unchanged. clip "mse" picks each group's
    range by the clipping search of `rtn.clipped_params`, its inputs' errors weighted by diag H. Falls back to RTN, with
    the reason in `fallback`, when the hessian is all zero, not finite, or cannot be factored.
    """
    if w.dim() != 2:
        raise MoecompressError(f"gptq_quantize takes one weight matrix [out, in], got shape {tuple(w.shape)}")
    in_features = w.shape[1]
    check_quant_args(in_features, bits, group_size)
    if hessian.shape != (in_features, in_features):
        raise MoecompressError(
            f"hessian of shape {tuple(hessian.shape)} does not match a weight with {in_features} inputs"
        )
    if block_size < 1:
        raise MoecompressError(f"block_size must be a positive number of columns, got {block_size}")
    if not torch.isfinite(w).all():
        raise MoecompressError("cannot quantize a weight with NaN or inf entries")
    h = hessian.to(device=w.device, dtype=torch.float32)
    h_finite = bool(torch.isfinite(h).all())

    weight, fallback = None, None
    if not h_finite:
        fallback = "hessian has NaN or inf entries"
    elif float(h.diagonal().sum()) == 0:
        fallback = "hessian is zero (no calibration tokens reached this weight)"
    else:
        weight = _gptq(w.to(torch.float32), h, bits, group_size, symmetric, damp, block_size, act_order, clip)
        if weight is None:
            fallback = f"Cholesky of the damped hessian failed (damp {damp} and {10 * damp})"
    if weight is None:
        weight = quantize_rtn(w, bits, group_size, symmetric, clip, h.diagonal() if h_finite else None)
    loss = layer_output_error(w, weight.dequantize(torch.float32), h) if h_finite else float("nan")
    return GPTQResult(weight=weight, fallback=fallback, loss=loss)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper U with U^T U = (H + damp * mean(diag H) * I)^-1, retried with 10x damping; None if both fail."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    for d in (damp, 10 * damp):
        lower, info = torch.linalg.cholesky_ex(h + (d * mean_diag) * eye)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0 and torch.isfinite(upper).all():
            return upper
    return None


def _gptq(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool, damp: float, block_size: int,
    act_order: bool, clip: str,
) -> QuantizedWeight | None:
    out_features, in_features = w.shape
    groups = in_features // group_size
    w = w.clone()  # [out, in], updated in place as columns are quantized
    h = h.clone()
    dead = torch.nonzero(h.diagonal() == 0).squeeze(1)
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.empty(out_features, groups, dtype=torch.float16, device=w.device)  # [out, in/g]
    zeros = None if symmetric else torch.empty(out_features, groups, dtype=torch.uint8, device=w.device)
    if act_order:
        s, z = group_params(w.reshape(out_features, groups, group_size), bits, symmetric, clip,
                            h.diagonal().reshape(groups, group_size))  # static groups
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        group_of = (perm // group_size).tolist()  # group of the column processed j-th
    else:
        perm = None
        group_of = [j // group_size for j in range(in_features)]
        # whole groups per block, so a group's parameters are taken from fully updated columns
        block_size = max(group_size, block_size // group_size * group_size)

    u = _inverse_hessian_cholesky(h, damp)  # [in, in], upper
    if u is None:
        return None

    q = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)  # [out, in], processing order
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = w[:, i1:i2]  # view: updates land in w
        u1 = u[i1:i2, i1:i2]
        err1 = torch.empty(out_features, i2 - i1, dtype=torch.float32, device=w.device)  # [out, block]
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if not act_order and j % group_size == 0:
                s, z = group_params(w1[:, i : i + group_size], bits, symmetric, clip, h.diagonal()[j : j + group_size])
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            s, z = scales[:, g], None if zeros is None else zeros[:, g]
            col = w1[:, i]
            q[:, j] = qc = quantize_values(col, s, z, bits)
            err = (col - dequantize_values(qc, s, z, bits)) / u1[i, i]
            w1[:, i:] -= torch.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, bits=bits, group_size=group_size)
