"""Weight-only quantized linear layers (``QuantLinear``) and ``quantize_model``, which puts them
in place of a model's ``nn.Linear`` layers. Activations stay in floating point; only the weights
are stored in 8 or 4 bits, and dequantized inside the matmul.

The schemes, and the bound each guarantees on every weight ``w`` and its dequantized ``ŵ``:

- ``int8``: symmetric, one scale per output channel (row): ``scale = max|w_row| / 127``,
  ``q = round(w / scale)`` in [-127, 127], ``ŵ = q · scale``; ``|w - ŵ| <= scale / 2``.
  Symmetric because torch's int8 kernel (``aten._weight_int8pack_mm``) takes one scale per
  output channel and no zero point; a row of a trained linear layer sits about 0 anyway.
- ``int4``: asymmetric, one scale and one minimum per group of ``group`` consecutive input
  columns of a row (the last group of a row may be shorter): ``scale = (max - min) / 15``,
  ``q = round((w - min) / scale)`` in [0, 15], ``ŵ = min + q · scale``;
  ``|w - ŵ| <= scale / 2``. Asymmetric because with 16 levels every level counts: the grid
  spans the group's own range, where a symmetric one spans ±max|w| and leaves half of it unused
  in a skewed group (and one level unused always). torch's int4 kernel takes a scale and a zero
  per group anyway, so the offset costs nothing at run time.

A constant row or group (``max == min``) gets scale 1 and is stored exactly.

Kernels. ``QuantLinear`` runs torch's native CPU kernels where they take the layer:
``aten._weight_int8pack_mm`` for int8 (any shape; float32, bfloat16 or float16 input) and
``aten._weight_int4pack_mm_for_cpu`` for int4 (weights packed by
``aten._convert_weight_to_int4pack_for_cpu``; it needs ``out_features % 16 == 0`` and a group of
32, 64, 128 or 256, and the input width a multiple of the group: a ragged last group is padded
with zero columns of the input). Elsewhere (another device, a layer the int4 kernel refuses) it
runs the reference path: dequantize, then ``F.linear``. ``QuantLinear.native`` says which path a
layer takes; the reference is also what the tests hold the kernels to.

Storage. What is saved (``QuantLinear.tensors``) is portable: int8 ``q`` (N, K) with ``scale``
(N,); int4 ``q`` as two 4-bit values a byte (the even column in the low nibble), (N, ceil(K/2))
uint8, with ``scale`` and ``min`` (N, groups) float32. The int4 kernel's packed layout is made
from it when a layer is built, so an int4 layer on the native path holds its weights twice (the
nibbles and the kernel's layout: 1 byte a weight in all, still a quarter of float32).

The output head and every linear layer whose weight is tied to another module (the usual
head-embedding tie) stay in float32 (``quantize_model``): a tied matrix quantized in the head
would leave the embedding holding the float copy (no memory saved, and two versions of one
matrix), and the head's error lands on every logit of a large vocabulary directly; in a small
model it is also a large share of the weights, which the linear-weight ratio does not count.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The schemes ``quantize_model`` takes.
SCHEMES = ("int8", "int4")
#: The group sizes the int4 kernel takes (another group is refused: every layer stays portable
#: between the native and the reference path).
INT4_GROUPS = (32, 64, 128, 256)
#: Names (fnmatch patterns on a module's full name or its last part) kept in float32 by default.
DEFAULT_SKIP = ("head", "lm_head")
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_scheme(weights: str, group: int) -> None:
    """Refuse a scheme or group ``quantize_model`` cannot build (ValueError, one line)."""
    if weights not in SCHEMES:
        raise ValueError(f"--weights {weights!r} is not a scheme: expected one of {SCHEMES}")
    if weights == "int4" and group not in INT4_GROUPS:
        raise ValueError(
            f"--group {group} is not an int4 group size: expected one of {INT4_GROUPS}"
        )


# --- quantize and dequantize -------------------------------------------------------------------


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (N, K), scale float32 (N,)): symmetric per output channel."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None].float()


def groups_of(k: int, group: int) -> int:
    return math.ceil(k / group)


def _grouped(w: Tensor, group: int) -> Tensor:
    """(N, K) -> (N, groups, group), the ragged last group padded by repeating its last column
    (which changes neither its min nor its max)."""
    n, k = w.shape
    pad = groups_of(k, group) * group - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, group)


def quantize_int4(w: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q uint8 (N, K) in [0, 15], scale (N, groups), min (N, groups)): asymmetric per group."""
    w = w.detach().float()
    g = _grouped(w, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(w.shape[0], -1)[:, : w.shape[1]].contiguous(), scale, lo


def dequantize_int4(q: Tensor, scale: Tensor, lo: Tensor, group: int) -> Tensor:
    k = q.shape[1]
    s = scale.float().repeat_interleave(group, dim=1)[:, :k]
    m = lo.float().repeat_interleave(group, dim=1)[:, :k]
    return m + q.float() * s


def pack_nibbles(q: Tensor) -> Tensor:
    """(N, K) values in [0, 15] -> (N, ceil(K/2)) uint8, column 2j in the low nibble."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: Tensor, k: int) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def error_bound(scale: Tensor, k: int, group: int | None = None) -> Tensor:
    """The largest ``|w - ŵ|`` each weight may have, (N, K): half its row's or group's scale."""
    if group is None:
        return (scale.float() / 2)[:, None].expand(-1, k)
    return (scale.float() / 2).repeat_interleave(group, dim=1)[:, :k]


# --- the layer ---------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A linear layer with weight-only quantized weights (``weights`` "int8" or "int4"; see the
    module's doc), built from a float layer (``from_linear``) or saved tensors
    (``from_tensors``). ``bias``, if any, stays in floating point."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weights: str,
        tensors: dict[str, Tensor],
        *,
        group: int | None = None,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_scheme(weights, group if weights == "int4" and group is not None else 128)
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.group = weights, (group if weights == "int4" else None)
        check_tensors(tensors, weights, in_features, out_features, self.group)
        for name, t in tensors.items():
            self.register_buffer(name, t.contiguous())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.native = self._native_ok()
        if self.native and weights == "int4":
            self._pack_int4()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weights: str, group: int = 128, hessian: Tensor | None = None
    ) -> QuantLinear:
        """``linear`` quantized: round-to-nearest, or for int4 with ``hessian`` (its inputs'
        ``XᵀX``, ``memext.nn.gptq``) GPTQ's levels."""
        w = linear.weight
        if weights == "int8":
            q, scale = quantize_int8(w)
            tensors = {"q": q, "scale": scale}
        else:
            check_scheme(weights, group)
            if hessian is None:
                q4, scale, lo = quantize_int4(w, group)
            else:
                from memext.nn.gptq import gptq_int4

                q4, scale, lo = gptq_int4(w.detach().cpu(), hessian, group)
            tensors = {"q": pack_nibbles(q4), "scale": scale, "min": lo}
        layer = cls(
            linear.in_features, linear.out_features, weights, tensors, group=group,
            bias=linear.bias,
        )  # fmt: skip
        return layer.to(w.device)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, Tensor],
        weights: str,
        linear: nn.Linear,
        group: int | None = None,
    ) -> QuantLinear:
        """The layer saved as ``tensors``, in place of float layer ``linear`` (its shape, bias and
        device)."""
        layer = cls(
            linear.in_features, linear.out_features, weights, dict(tensors), group=group,
            bias=linear.bias,
        )  # fmt: skip
        return layer.to(linear.weight.device)

    def tensors(self) -> dict[str, Tensor]:
        """What is saved: ``q`` and ``scale`` (int8), and ``min`` (int4)."""
        names = ("q", "scale") if self.weights == "int8" else ("q", "scale", "min")
        return {n: getattr(self, n) for n in names}

    def _native_ok(self) -> bool:
        if self.weights == "int8":
            return True
        return self.out_features % 16 == 0 and self.group in INT4_GROUPS

    def _pack_int4(self) -> None:
        assert self.group is not None
        k, n = self.in_features, self.out_features
        width = groups_of(k, self.group) * self.group
        q = unpack_nibbles(self.q, k).to(torch.int32)
        if width > k:
            q = F.pad(q, (0, width - k), value=8)  # meets the input's zero columns
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu().contiguous(), 1)
        # The kernel dequantizes (q - 8) * scale + zero: zero = min + 8 * scale.
        zeros = self.min.float() + 8 * self.scale.float()
        scale_zero = torch.stack([self.scale.float(), zeros], dim=-1).transpose(0, 1)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zero", scale_zero.contiguous(), persistent=False)
        self._width = width
        assert self.packed.shape[0] == n

    def dequantize(self) -> Tensor:
        """The float32 weight (N, K) the layer computes with: the reference."""
        if self.weights == "int8":
            return dequantize_int8(self.q, self.scale)
        assert self.group is not None
        return dequantize_int4(unpack_nibbles(self.q, self.in_features), self.scale, self.min,
                               self.group)  # fmt: skip

    def uses_native(self, x: Tensor) -> bool:
        """Whether input ``x`` goes through torch's kernel (else the reference path)."""
        return self.native and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES

    #: The dtype the native kernel reads the input in (None: the input's own). torch 2.13's CPU
    #: kernels are fast for bfloat16 input only: at batch 1 on SmolLM2's shapes, float32 input
    #: takes 10-30x an nn.Linear's time, bfloat16 input 0.5-1.2x. bfloat16 rounds each input
    #: and output to 8 significant bits (``set_activation_dtype``).
    act_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.act_dtype is not None and x.dtype != self.act_dtype and self.uses_native(x):
            return self.forward(x.to(self.act_dtype)).to(x.dtype)
        if not self.uses_native(x):
            return self.reference(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.weights == "int8":
            out = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale.to(x.dtype))
        else:
            if self._width > self.in_features:
                x2 = F.pad(x2, (0, self._width - self.in_features))
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group, self.scale_zero.to(x.dtype)
            )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def reference(self, x: Tensor) -> Tensor:
        """Dequantize, then ``F.linear``: what every path computes."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        path = "native" if self.native else "reference"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weights={self.weights}{group}, path={path}"
        )


def expected_shapes(
    weights: str, k: int, n: int, group: int | None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The saved tensors of a layer of ``k`` inputs and ``n`` outputs: name -> (shape, dtype)."""
    if weights == "int8":
        return {"q": ((n, k), torch.int8), "scale": ((n,), torch.float32)}
    assert group is not None
    g = groups_of(k, group)
    return {
        "q": ((n, (k + 1) // 2), torch.uint8),
        "scale": ((n, g), torch.float32),
        "min": ((n, g), torch.float32),
    }


def check_tensors(
    tensors: dict[str, Tensor], weights: str, k: int, n: int, group: int | None
) -> None:
    """Refuse saved tensors of the wrong names, shapes, dtypes or values (ValueError)."""
    want = expected_shapes(weights, k, n, group)
    if set(tensors) != set(want):
        raise ValueError(f"expected tensors {sorted(want)}, found {sorted(tensors)}")
    for name, (shape, dtype) in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"{name}: expected {dtype} {list(shape)}, found {t.dtype} {list(t.shape)}"
            )
    scale = tensors["scale"]
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError("scale: every scale must be finite and positive")
    if "min" in tensors and not bool(torch.isfinite(tensors["min"]).all()):
        raise ValueError("min: not finite")
    if weights == "int8" and bool((tensors["q"] == -128).any()):
        raise ValueError("q: int8 values lie in [-127, 127]")


# --- a whole model -----------------------------------------------------------------------------


def tied_linears(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` layers whose weight another module also holds (a tied head)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    tied = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and len(owners.get(id(module.weight), [])) > 1:
            tied.add(name)
    return tied


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def quantizable(
    model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP
) -> tuple[list[str], dict[str, str]]:
    """The ``nn.Linear`` layers ``quantize_model`` replaces, and those it keeps (name -> why)."""
    skip = tuple(skip)
    tied = tied_linears(model)
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name in tied:
            skipped[name] = "tied to another module's weight"
        elif _skipped(name, skip):
            skipped[name] = "skipped by name"
        else:
            names.append(name)
    return names, skipped


def quantize_model(
    model: nn.Module,
    weights: str = "int8",
    group: int = 128,
    skip: Iterable[str] = DEFAULT_SKIP,
    log: Callable[[str], None] | None = None,
    hessians: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Replace every ``nn.Linear`` of ``model`` in place by a ``QuantLinear`` of scheme
    ``weights`` (int4 in groups of ``group`` input columns), except those named by ``skip``
    (fnmatch patterns on a module's full name or its last part: by default the output head) and
    every layer whose weight is tied to another module. ``hessians`` (layer name -> its inputs'
    ``XᵀX``, ``memext.nn.gptq.input_hessians``) has int4 layers rounded by GPTQ. Returns what it
    did: ``layers`` (name -> {in, out, native}), ``skipped`` (name -> why)."""
    check_scheme(weights, group)
    names, skipped = quantizable(model, skip)
    done: dict[str, Any] = {}
    for name in names:
        module = model.get_submodule(name)
        h = hessians.get(name) if hessians is not None else None
        layer = QuantLinear.from_linear(module, weights, group, h)
        done[name] = {"in": module.in_features, "out": module.out_features,
                      "native": layer.native, **weight_checksum(module)}  # fmt: skip
        replace_module(model, name, layer)
        if log is not None and not layer.native:
            log(f"{name}: {module.out_features} outputs, not a multiple of 16: the int4 kernel "
                "refuses it, so it runs the reference path (dequantize, then matmul)")  # fmt: skip
    return {"weights": weights, "group": group if weights == "int4" else None,
            "layers": done, "skipped": skipped}  # fmt: skip


def set_activation_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Have every ``QuantLinear`` of ``model`` run its native kernel on input cast to ``dtype``
    (``torch.bfloat16``: the fast path on CPU), the output cast back; None: the input's own."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.act_dtype = dtype


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantized_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every ``QuantLinear``'s saved tensors, ``NAME.q`` / ``NAME.scale`` / ``NAME.min``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for t, value in module.tensors().items():
                out[f"{name}.{t}"] = value.detach().cpu().contiguous()
    return out


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized layers' saved tensors, and of their float32 weights."""
    quant = fp32 = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            quant += sum(t.numel() * t.element_size() for t in module.tensors().values())
            fp32 += module.in_features * module.out_features * 4
    return {"quantized": quant, "fp32": fp32}


def apply_quantized(
    model: nn.Module,
    tensors: dict[str, Tensor],
    weights: str,
    group: int | None,
    layers: dict[str, Any],
) -> None:
    """Replace the ``nn.Linear`` layers ``layers`` names (name -> {in, out, sum, abs_sum}) by
    ``QuantLinear`` layers built from ``tensors`` (``quantized_tensors``' names). ``sum`` and
    ``abs_sum`` (``weight_checksum`` of the float weights quantized) refuse a model whose weights
    are not those. Any mismatch is a ValueError naming the layer; the model is changed only
    when every layer fits."""
    built = {}
    expected = set()
    for name, shape in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is a {type(module).__name__}, not a linear layer")
        if (module.in_features, module.out_features) != (shape["in"], shape["out"]):
            raise ValueError(
                f"{name!r} is {module.in_features} -> {module.out_features} in the model, "
                f"{shape['in']} -> {shape['out']} in the quantized file"
            )
        if "sum" in shape:
            got = weight_checksum(module)
            # Summed in float64: another device's order changes it by ~1e-16 of the magnitude.
            tol = 1e-9 * max(float(shape["abs_sum"]), 1e-30)
            if any(abs(got[k] - float(shape[k])) > tol for k in ("sum", "abs_sum")):
                raise ValueError(
                    f"{name!r}: the model's weights are not those that were quantized "
                    f"(sum {got['sum']!r}, expected {shape['sum']!r})"
                )
        names = expected_shapes(weights, module.in_features, module.out_features, group)
        mine = {t: tensors.get(f"{name}.{t}") for t in names}
        missing = [t for t, v in mine.items() if v is None]
        if missing:
            raise ValueError(f"{name!r}: no {', '.join(missing)} tensor")
        expected.update(f"{name}.{t}" for t in names)
        try:
            built[name] = QuantLinear.from_tensors(mine, weights, module, group)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"tensors for no listed layer: {', '.join(extra[:5])}")
    for name, layer in built.items():
        replace_module(model, name, layer)


def weight_checksum(linear: nn.Linear) -> dict[str, float]:
    """The sum and the sum of magnitudes of a layer's float weights, in float64: what identifies
    the weights a quantized layer was made from, without hashing them."""
    w = linear.weight.detach().double()
    return {"sum": float(w.sum()), "abs_sum": float(w.abs().sum())}
