"""Random small CNNs written directly as ONNX models, for property tests and tools/fuzz.py.

    random_cnn()            hypothesis strategy of (ModelProto, input_shape)
    build_random_cnn(seed)  the same generator driven by a numpy RNG (no hypothesis needed)

A model is opset 17, ir_version 8, float32, one input "input" of shape (1, C0, H, H) with C0 in 1..4
and H in {8, 12, 16}, followed by 1-6 random blocks (BLOCKS) and a head, with one or two outputs.
Channel counts stay in 1..12 (16 after a Concat), spatial sizes in 2..16, kernels under 3000, so
ONNX Runtime runs a model in about a millisecond. A model is either "BN kept" (convs may be followed
by BatchNormalization) or "BN folded" (no BatchNormalization node; conv rows scaled per channel and
biased, as a folded BN leaves them). The block kinds are listed in metadata_props["graphgen_blocks"];
node names start with the block that made them ("b2_se/Conv_7"), so a failing node is easy to place.

Structural choices come from hypothesis draws (which shrink) or a numpy RNG; weights always come from a
separate numpy RNG, seeded by a drawn integer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
MAX_CHANNELS = 12
MAX_CONCAT_CHANNELS = 16
MAX_SPATIAL = 16
KERNEL_BUDGET = 2200  # no new block once this many kernels exist; a block adds < 800

BLOCKS = ("chain", "residual", "concat", "split", "depthwise", "grouped", "convtranspose",
          "pool", "resize", "se", "c2f")
ACTIVATIONS = (None, "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish", "Tanh")
HEADS = ("feature", "gemm")


# ---------------------------------------------------------------- structural choices
class _Choices:
    """Every choice goes through `integer(lo, hi)`: a numpy RNG, or hypothesis draws, which shrink
    to the low end, so a minimal failing model takes the first option and leaves optional parts out."""

    def __init__(self, integer):
        self.integer = integer

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]

    def coin(self, p: float = 0.5) -> bool:
        return self.integer(0, 999) >= round((1 - p) * 1000)


# ---------------------------------------------------------------- graph builder
@dataclass(frozen=True)
class Feature:
    """A 4-D tensor (1, channels, size, size) of the graph under construction."""

    name: str
    channels: int
    size: int


def same_size(size: int, stride: int) -> int:
    """Output size of a conv/pool whose pads total (effective kernel - 1), or auto_pad SAME_*."""
    return (size - 1) // stride + 1


class _Builder:
    def __init__(self, choose, wrng: np.random.Generator, bn_kept: bool):
        self.choose, self.wrng, self.bn_kept = choose, wrng, bn_kept
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counter = 0
        self.scope = "stem"
        self.kernels = 0

    # -- names, initializers, nodes
    def _uid(self) -> int:
        self.counter += 1
        return self.counter

    def init(self, value: np.ndarray, hint: str) -> str:
        name = f"{self.scope}/{hint}_{self._uid()}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        name = f"{self.scope}/{op}_{self._uid()}"
        outputs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs

    def weights(self, shape, fan_in: float) -> np.ndarray:
        """He-normal: activations keep their scale through Relu-like layers."""
        return (self.wrng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1.0))).astype(np.float32)

    def bias(self, n: int, scale: float = 0.2) -> str:
        return self.init((self.wrng.standard_normal(n) * scale).astype(np.float32), "B")

    # -- layers
    def conv(self, x: Feature, cout: int, k: int = 1, stride: int = 1, dilation: int = 1,
             group: int = 1, pads: str = "same") -> Feature:
        """Conv; pads "same" (symmetric, asymmetric or auto_pad SAME_*, all the same size) or "valid"."""
        c = self.choose
        span = dilation * (k - 1) + 1
        w = self.weights((cout, x.channels // group, k, k), x.channels // group * k * k)
        bias = (not self.bn_kept and c.coin(0.8)) or c.coin(0.4)
        if not self.bn_kept:  # what folding a BatchNormalization leaves in the weights
            w *= self.wrng.uniform(0.3, 2.0, (cout, 1, 1, 1)).astype(np.float32)
        inputs = [x.name, self.init(w, "W")]
        if bias:
            inputs.append(self.bias(cout))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride])
        if dilation > 1 or c.coin(0.2):
            attrs["dilations"] = [dilation, dilation]
        if group > 1:
            attrs["group"] = group
        if pads == "valid":
            attrs["pads"] = [0, 0, 0, 0]
            size = (x.size - span) // stride + 1
        else:
            # ONNX Runtime refuses auto_pad SAME_* with dilation > 1
            styles = ("symmetric", "asymmetric", "auto") if dilation == 1 else ("symmetric", "asymmetric")
            style = c.choice(styles) if span > 1 else "symmetric"
            if style == "auto":
                attrs["auto_pad"] = c.choice(("SAME_UPPER", "SAME_LOWER"))
            else:
                top = left = (span - 1) // 2
                if style == "asymmetric":
                    top, left = c.integer(0, span - 1), c.integer(0, span - 1)
                if span > 1 or c.coin(0.3):
                    attrs["pads"] = [top, left, span - 1 - top, span - 1 - left]
            size = same_size(x.size, stride)
        self.kernels += cout * x.channels // group
        return Feature(self.node("Conv", inputs, **attrs)[0], cout, size)

    def conv_transpose(self, x: Feature, cout: int, group: int, upsample: bool) -> Feature:
        k, stride = (2, 2) if upsample else (3, 1)
        w = self.weights((x.channels, cout // group, k, k), x.channels // group * k * k / stride**2)
        inputs = [x.name, self.init(w, "W")]
        if self.choose.coin(0.5):
            inputs.append(self.bias(cout))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride])
        if not upsample:
            attrs["pads"] = [1, 1, 1, 1]
        if group > 1:
            attrs["group"] = group
        self.kernels += x.channels * cout // group
        return Feature(self.node("ConvTranspose", inputs, **attrs)[0], cout, x.size * stride)

    def batchnorm(self, x: Feature) -> Feature:
        n, r = x.channels, self.wrng
        gamma = r.uniform(0.2, 1.5, n) * np.where(r.random(n) < 0.1, -1.0, 1.0)
        params = [gamma, r.normal(0, 0.2, n), r.normal(0, 0.1, n), r.uniform(0.5, 2.0, n)]
        inputs = [x.name] + [self.init(p.astype(np.float32), h) for p, h in zip(params, "gamma beta mean var".split())]
        return Feature(self.node("BatchNormalization", inputs, epsilon=1e-5)[0], n, x.size)

    def act(self, x: Feature, kind: str | None) -> Feature:
        if kind is None:
            return x
        if kind == "LeakyRelu":
            out = self.node(kind, [x.name], alpha=self.choose.choice((0.1, 0.01)))
        elif kind == "Clip":
            lo, hi = (self.init(np.array(v, np.float32), h) for v, h in ((0.0, "min"), (6.0, "max")))
            out = self.node(kind, [x.name, lo, hi])
        else:
            out = self.node(kind, [x.name])
        return Feature(out[0], x.channels, x.size)

    def unit(self, x: Feature, cout: int, act: str | None = "random", **conv) -> Feature:
        """Conv + optional BatchNormalization (BN-kept models only) + activation."""
        y = self.conv(x, cout, **conv)
        if self.bn_kept and self.choose.coin(0.7):
            y = self.batchnorm(y)
        return self.act(y, self.choose.choice(ACTIVATIONS) if act == "random" else act)

    def random_unit(self, x: Feature, cout: int, stride: int = 1, act: str | None = "random",
                    valid_ok: bool = False) -> Feature:
        """A unit with random kernel/dilation/pads; output size is same_size() unless valid_ok."""
        c = self.choose
        options = [(k, d) for k in (1, 3, 5) for d in ((1, 2) if k > 1 else (1,))
                   if d * (k - 1) + 1 <= max(3, x.size)]
        k, d = c.choice(options)
        span = d * (k - 1) + 1
        pads = "valid" if valid_ok and span > 1 and (x.size - span) // stride + 1 >= 2 and c.coin(0.25) else "same"
        return self.unit(x, cout, act, k=k, stride=stride, dilation=d, pads=pads)

    def channels(self, lo: int = 1, hi: int = MAX_CHANNELS) -> int:
        return self.choose.integer(lo, hi)

    def stride(self, x: Feature, p: float = 0.3) -> int:
        return 2 if x.size >= 4 and self.choose.coin(p) else 1

    def adapt(self, x: Feature, ok, make) -> Feature:
        """A 1x1 unit to `make()` channels when `ok(x.channels)` is false."""
        return x if ok(x.channels) else self.unit(x, make(), k=1)

    def pool(self, x: Feature, op: str, halve: bool) -> Feature:
        if halve:
            out = self.node(op, [x.name], kernel_shape=[2, 2], strides=[2, 2])
            return Feature(out[0], x.channels, x.size // 2)
        out = self.node(op, [x.name], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        return Feature(out[0], x.channels, x.size)

    def concat(self, parts: list[Feature]) -> Feature:
        out = self.node("Concat", [p.name for p in parts], axis=1)[0]
        return Feature(out, sum(p.channels for p in parts), parts[0].size)

    def global_pool(self, x: Feature) -> Feature:
        return Feature(self.node("GlobalAveragePool", [x.name])[0], x.channels, 1)


# ---------------------------------------------------------------- blocks
def _chain(b: _Builder, x: Feature) -> Feature:
    for _ in range(b.choose.integer(1, 3)):
        x = b.random_unit(x, b.channels(), stride=b.stride(x), valid_ok=True)
    return x


def _residual(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    cout = x.channels if c.coin(0.6) else b.channels()
    stride = b.stride(x, 0.25)

    def branch():
        y = b.random_unit(x, b.channels(), stride=stride)
        return b.random_unit(y, cout, act=None) if c.coin(0.6) else b.random_unit(y, cout)

    skip = x if cout == x.channels and stride == 1 and c.coin(0.8) else b.unit(x, cout, act=None, k=1, stride=stride)
    op = c.choice(("Add", "Add", "Add", "Sub", "Sum"))
    operands = [branch(), skip] + ([branch()] if op == "Sum" and c.coin(0.5) else [])
    if c.coin(0.5):
        operands.reverse()
    out = b.node(op, [o.name for o in operands])[0]
    return b.act(Feature(out, cout, operands[0].size), c.choice(ACTIVATIONS))


def _concat(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    n, stride = c.integer(2, 3), b.stride(x, 0.2)
    parts = []
    for i in range(n):
        room = MAX_CONCAT_CHANNELS - sum(p.channels for p in parts) - (n - 1 - i)
        kind = c.choice(("conv", "identity", "pool", "depthwise") if i == 0 and stride == 1 else ("conv", "pool"))
        if kind == "identity" and x.channels <= room:
            parts.append(x)
        elif kind == "pool":  # Inception-style: pool then 1x1
            y = b.pool(x, c.choice(("MaxPool", "AveragePool")), False) if stride == 1 else Feature(
                b.node("MaxPool", [x.name], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])[0],
                x.channels, same_size(x.size, 2))
            parts.append(b.unit(y, c.integer(1, max(1, min(8, room))), k=1))
        elif kind == "depthwise" and x.channels <= room:
            parts.append(b.unit(x, x.channels, k=3, group=x.channels))
        else:
            parts.append(b.random_unit(x, c.integer(1, max(1, min(8, room))), stride=stride))
    if c.coin(0.3):
        parts.reverse()
    return b.act(b.concat(parts), c.choice(ACTIVATIONS) if c.coin(0.3) else None)


def _split(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    x = b.adapt(x, lambda ch: ch >= 2, lambda: b.channels(2))
    n = c.integer(2, min(3, x.channels))
    cuts = sorted(c.integer(1, x.channels - 1) for _ in range(n - 1))
    sizes = [hi - lo for lo, hi in zip([0] + cuts, cuts + [x.channels]) if hi > lo]  # equal cuts merge
    if len(sizes) < 2:
        sizes = [1, x.channels - 1]
    split = b.init(np.array(sizes, np.int64), "split")
    names = b.node("Split", [x.name, split], n_out=len(sizes), axis=1)
    parts = [Feature(name, ch, x.size) for name, ch in zip(names, sizes)]
    if c.coin(0.25):  # one part is left unused: its channels die
        del parts[c.integer(0, len(parts) - 1)]
    processed = []
    for p in parts:
        kind = c.choice(("identity", "conv", "act"))
        if kind == "conv":
            p = b.random_unit(p, p.channels if c.coin(0.5) else b.channels(1, 6))
        elif kind == "act":
            p = b.act(p, c.choice(ACTIVATIONS[1:]))
        processed.append(p)
    if len(processed) == 1:
        return processed[0]
    if c.coin(0.5):  # shuffle-like reordering
        processed.reverse()
    return b.concat(processed)


def _depthwise(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    x = b.adapt(x, lambda ch: ch >= 2, lambda: b.channels(2))
    mult = 2 if 2 * x.channels <= MAX_CHANNELS and c.coin(0.2) else 1
    k, d = c.choice(((3, 1), (5, 1), (3, 2)))
    y = b.unit(x, x.channels * mult, k=k, dilation=d, stride=b.stride(x), group=x.channels)
    if c.coin(0.7):  # pointwise
        y = b.unit(y, b.channels(), k=1, act=c.choice(ACTIVATIONS))
    return y


def _group_of(b: _Builder, x: Feature) -> tuple[Feature, int]:
    c = b.choose
    g = c.choice((2, 4))
    x = b.adapt(x, lambda ch: ch % g == 0, lambda: g * c.integer(1, MAX_CHANNELS // g))
    return x, g


def _grouped(b: _Builder, x: Feature) -> Feature:
    x, g = _group_of(b, x)
    k = b.choose.choice((1, 3))
    return b.unit(x, g * b.choose.integer(1, MAX_CHANNELS // g), k=k, stride=b.stride(x), group=g)


def _convtranspose(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    g = 1
    if c.coin(0.3):
        x, g = _group_of(b, x)
    y = b.conv_transpose(x, g * c.integer(1, MAX_CHANNELS // g), g, upsample=2 * x.size <= MAX_SPATIAL and c.coin(0.7))
    if b.bn_kept and c.coin(0.5):
        y = b.batchnorm(y)
    return b.act(y, c.choice(ACTIVATIONS))


def _pool(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    return b.pool(x, c.choice(("MaxPool", "AveragePool")), halve=x.size >= 4 and c.coin(0.6))


def _resize(b: _Builder, x: Feature) -> Feature:
    """Nearest x2 Resize; when the map is too large (or by chance) it is first halved, and the
    upsampled map may then be fused with the skip, as FPN / U-Net decoders do."""
    c = b.choose
    skip, down = x, 2 * x.size > MAX_SPATIAL or c.coin(0.4)
    if down:
        x = b.pool(x, "MaxPool", True) if c.coin(0.5) else b.random_unit(x, b.channels(), stride=2)
    x = b.random_unit(x, b.channels()) if c.coin(0.4) else x
    scales = np.array([1, 1, 2, 2], np.float32)
    if c.coin(0.3):  # as exporters write it
        scales_name = b.node("Constant", [], value=numpy_helper.from_array(scales))[0]
    else:
        scales_name = b.init(scales, "scales")
    attrs = dict(mode="nearest")
    if c.coin(0.5):
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    y = Feature(b.node("Resize", [x.name, "", scales_name], **attrs)[0], x.channels, 2 * x.size)
    if down and y.size == skip.size and c.coin(0.7):
        if c.coin(0.5):
            y = b.concat([skip, y] if c.coin(0.5) else [y, skip])
        else:
            y = b.adapt(y, lambda ch: ch == skip.channels, lambda: skip.channels)
            y = Feature(b.node("Add", [skip.name, y.name])[0], y.channels, y.size)
    return y


def _se(b: _Builder, x: Feature) -> Feature:
    c = b.choose
    if c.coin(0.5):
        x = b.random_unit(x, b.channels())
    g = b.global_pool(x)
    g = b.act(b.unit(g, max(1, x.channels // 4), k=1, act=None), "Relu")
    g = b.unit(g, x.channels, k=1, act=None)
    g = Feature(b.node(c.choice(("Sigmoid", "Sigmoid", "HardSigmoid")), [g.name])[0], x.channels, 1)
    out = b.node("Mul", [x.name, g.name] if c.coin(0.7) else [g.name, x.name])[0]
    return Feature(out, x.channels, x.size)



def _c2f(b: _Builder, x: Feature) -> Feature:
    """YOLOv8's C2f: a 1x1 unit split in halves, the second half through one or two residual bottlenecks,
    both halves and every bottleneck's sum concatenated into a 1x1 unit. A bottleneck's last conv is weak
    (x 1e-3) at times, so that a selection empties it: its sum passes the skip on, the Concat reads a tensor
    twice, and the rewrite merges the two reads (rewrite/merge_reads.py)."""
    c = b.choose
    half = c.integer(1, MAX_CONCAT_CHANNELS // 4)  # (2 + bottlenecks) x half <= 16
    y = b.unit(x, 2 * half, k=1)
    names = b.node("Split", [y.name, b.init(np.array([half, half], np.int64), "split")], n_out=2, axis=1)
    parts = [Feature(names[0], half, y.size), Feature(names[1], half, y.size)]
    for _ in range(c.integer(1, 2)):
        m = b.unit(parts[-1], b.channels(1, 8), k=c.choice((1, 3)))
        start = len(b.inits)
        m = b.unit(m, half, k=c.choice((1, 3)))
        if c.coin(0.5):
            weight = next(t for t in b.inits[start:] if "/W_" in t.name)
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1e-3), weight.name))
        parts.append(Feature(b.node("Add", [parts[-1].name, m.name])[0], half, y.size))
    return b.unit(b.concat(parts), b.channels(), k=1)

_BLOCK_FUNCS = {name: globals()[f"_{name}"] for name in BLOCKS}


# ---------------------------------------------------------------- model
def _generate(choose, wrng: np.random.Generator, max_blocks: int = 6) -> tuple[onnx.ModelProto, tuple]:
    c0, size = choose.integer(1, 4), choose.choice((8, 12, 16))
    b = _Builder(choose, wrng, bn_kept=choose.coin(0.5))
    x = Feature("input", c0, size)
    kinds, features = [], []
    for i in range(choose.integer(1, max_blocks)):
        if b.kernels > KERNEL_BUDGET:
            break
        kind = choose.choice(BLOCKS)
        b.scope = f"b{i}_{kind}"
        x = _BLOCK_FUNCS[kind](b, x)
        kinds.append(kind)
        features.append(x)
    if b.kernels == 0 and choose.coin(0.8):  # keep conv-free models (nothing to prune) rare
        b.scope = f"b{len(kinds)}_chain"
        x = _chain(b, x)
        kinds.append("chain")
        features.append(x)

    b.scope = "head"
    head = choose.choice(HEADS)
    f32 = TensorProto.FLOAT
    outputs = []
    if head == "gemm":
        flat = b.node("Flatten", [b.global_pool(x).name], axis=1)[0]
        n = choose.integer(1, 10)
        trans = choose.coin(0.5)
        w = b.weights((n, x.channels) if trans else (x.channels, n), x.channels)
        inputs = [flat, b.init(w, "W"), b.bias(n, 0.1)]
        outputs.append(helper.make_tensor_value_info(b.node("Gemm", inputs, transB=int(trans))[0], f32, [1, n]))
    taps = features[:-1] + ([x] if head == "gemm" else [])
    if taps and choose.coin(0.35):
        t = choose.choice(taps)
        outputs.append(helper.make_tensor_value_info(t.name, f32, [1, t.channels, t.size, t.size]))
    if head == "feature":
        outputs.insert(0, helper.make_tensor_value_info(x.name, f32, [1, x.channels, x.size, x.size]))
    kinds.append(f"head-{head}")

    input_shape = (1, c0, size, size)
    graph = helper.make_graph(b.nodes, "random_cnn", [helper.make_tensor_value_info("input", f32, list(input_shape))],
                              outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="lean-onnx tests/graphgen.py")
    helper.set_model_props(model, {"graphgen_blocks": ",".join(kinds),
                                   "graphgen_bn": "kept" if b.bn_kept else "folded"})
    onnx.checker.check_model(model, full_check=True)
    return model, input_shape


def build_random_cnn(seed: int, max_blocks: int = 6) -> tuple[onnx.ModelProto, tuple]:
    """One random CNN from an integer seed (numpy RNG); the same seed gives the same model."""
    structure, weights = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(structure)
    choose = _Choices(lambda lo, hi: int(rng.integers(lo, hi + 1)))
    return _generate(choose, np.random.default_rng(weights), max_blocks)


def random_cnn(max_blocks: int = 6):
    """Hypothesis strategy of (ModelProto, input_shape); structure is drawn (and shrinks), weights
    come from a drawn seed."""
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw):
        weight_seed = draw(st.integers(0, 2**32 - 1))
        choose = _Choices(lambda lo, hi: draw(st.integers(lo, hi)))
        return _generate(choose, np.random.default_rng(weight_seed), max_blocks)

    return strategy()
