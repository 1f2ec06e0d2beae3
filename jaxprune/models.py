"""Reference architectures (ShrinkBench-style) in flax nnx, NHWC.

* :class:`MLP` / :func:`lenet_300_100` — LeNet-300-100 (Han et al. 2015).
* :class:`LeNet5Caffe` — conv 20 -> conv 50 -> dense 800->500 -> 10 (Caffe's LeNet-5).
* :class:`VGGSmall` — a small VGG with BatchNorm.
* :class:`ResNet20` — He et al. 2016's CIFAR ResNet-20 (3 stages x 3 basic
  blocks, 16/32/64 channels), projection shortcuts where the shape changes.

All take images ``[N, 28, 28, C]`` (or flat vectors for the MLP) and return logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune._tree import as_int

__all__ = ["MLP", "lenet_300_100", "LeNet5Caffe", "VGGSmall", "ResNet20", "BasicBlock"]


class MLP(nnx.Module):
    """A ReLU multilayer perceptron; inputs are flattened first.

    ``features`` lists the widths from input to output: ``(784, 300, 100, 10)``
    is LeNet-300-100 (:func:`lenet_300_100`).

    Args:
      *args, **kwargs: the constructor's arguments below (flax nnx reports the class's
        signature as ``(*args, **kwargs)``).
      features: the layer widths from input to output, at least two (``(in, out)``: one
        linear layer); the input width is that of the flattened inputs.
      rngs: the random number streams that initialize the layers (keyword-only).
      dtype: the dtype of the parameters and of the computation (keyword-only; default
        ``jnp.float32``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune.models import MLP
      >>> model = MLP((784, 64, 10), rngs=nnx.Rngs(0))
      >>> model(jnp.ones((2, 28, 28, 1))).shape  # images are flattened to 784 features
      (2, 10)
      >>> [layer.kernel.shape for layer in model.layers]
      [(784, 64), (64, 10)]
    """

    def __init__(self, features: Sequence[int], *, rngs: nnx.Rngs, dtype=jnp.float32):
        if len(features) < 2:
            raise ValueError(
                f"features needs at least (in, out), got {features!r}. Fix: e.g. "
                "features=(784, 300, 100, 10)."
            )
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, rngs=rngs, param_dtype=dtype, dtype=dtype)
                for a, b in zip(features[:-1], features[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def lenet_300_100(*, rngs: nnx.Rngs, in_features: int = 784, num_classes: int = 10) -> MLP:
    """Returns LeNet-300-100 (266,610 parameters for 784 inputs).

    Args:
      rngs: the random number streams that initialize the layers.
      in_features: the flattened input size (default 784: 28 x 28 x 1 images).
      num_classes: the number of logits (default 10).

    References:
      LeCun et al. 1998; Han et al. 2015, https://arxiv.org/abs/1506.02626

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> from jaxprune.models import lenet_300_100
      >>> model = lenet_300_100(rngs=nnx.Rngs(0))
      >>> sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
      266610
    """
    return MLP((in_features, 300, 100, num_classes), rngs=rngs)


class LeNet5Caffe(nnx.Module):
    """Caffe's LeNet-5: conv5x5(20) pool conv5x5(50) pool dense(800->500) dense(10).

    431,080 parameters on 28x28x1 inputs (431K, as reported by Han et al. 2015).
    ``features`` sets the three widths (conv1, conv2, fc1), e.g. those of a
    pruned network, to train a dense network of the same size.

    Args:
      *args, **kwargs: the constructor's arguments below, all keyword-only (flax nnx
        reports the class's signature as ``(*args, **kwargs)``).
      rngs: the random number streams that initialize the layers.
      in_channels: the input images' channels (default 1). The images must be 28 x 28:
        ``fc1`` expects the 4 x 4 maps that the two conv+pool stages leave of them.
      num_classes: the number of logits (default 10).
      features: three positive ints, the widths of conv1, conv2 and fc1 (default
        ``(20, 50, 500)``, Caffe's).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        in_channels: int = 1,
        num_classes: int = 10,
        features: Sequence[int] = (20, 50, 500),
    ):
        widths = tuple(features)
        if len(widths) != 3 or any(int(w) != w or w < 1 for w in widths):
            raise ValueError(
                f"features must be three positive ints (conv1, conv2, fc1), got {features!r}. "
                "Fix: e.g. features=(20, 50, 500), the default."
            )
        c1, c2, f1 = (int(w) for w in widths)
        self.conv1 = nnx.Conv(in_channels, c1, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(16 * c2, f1, rngs=rngs)
        self.fc2 = nnx.Linear(f1, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:3]) != (28, 28):
            raise ValueError(
                f"LeNet5Caffe takes [N, 28, 28, channels] images (fc1 reads the 4 x 4 maps "
                f"its two conv+pool stages leave of 28 x 28), got shape {jnp.shape(x)}. Fix: "
                "x.reshape(-1, 28, 28, 1) for flat MNIST rows, or resize the images to 28 x 28."
            )
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))


class VGGSmall(nnx.Module):
    """A small VGG: 3x3 conv -> BatchNorm -> ReLU blocks, 'M' = 2x2 max-pool, then dense.

    ``cfg`` lists the conv widths in order, ``"M"`` for a pooling; ``hidden`` is
    the width of the dense layer before the classifier. Each conv with its
    BatchNorm and the next layer's input channels is one channel group of
    ``jp.structure.groups``.

    Args:
      *args, **kwargs: the constructor's arguments below, all keyword-only (flax nnx
        reports the class's signature as ``(*args, **kwargs)``).
      rngs: the random number streams that initialize the layers.
      cfg: the conv widths in order (ints), ``"M"`` for a 2x2 max-pool (default
        ``(32, 32, "M", 64, 64, "M", 128, "M")``).
      in_channels: the input images' channels (default 1).
      num_classes: the number of logits (default 10).
      image_size: the side of the square input images (default 28); each ``"M"``
        halves it, rounding down, which sets ``fc1``'s input size.
      hidden: the width of the dense layer before the classifier (default 256).

    References:
      Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
      Image Recognition", ICLR 2015. https://arxiv.org/abs/1409.1556

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune.models import VGGSmall
      >>> make = lambda: VGGSmall(cfg=(8, "M", 16, "M"), hidden=32, rngs=nnx.Rngs(0))
      >>> model = nnx.eval_shape(make)  # shapes only: make() builds the real one
      >>> [c.kernel.shape for c in model.convs], model.fc1.kernel.shape  # 28 -> 14 -> 7
      ([(3, 3, 1, 8), (3, 3, 8, 16)], (784, 32))
      >>> jax.eval_shape(lambda m, x: m(x), model, jnp.ones((2, 28, 28, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        cfg: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, "M"),
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        hidden: int = 256,
    ):
        convs, bns, c, size = [], [], in_channels, image_size
        self.cfg = tuple(cfg)
        bad = [v for v in self.cfg if v != "M" and (as_int(v) is None or v < 1)]
        if bad or as_int(image_size) is None or image_size < 1:
            raise ValueError(
                f"cfg must hold positive int widths and 'M' (a 2x2 max-pool), and image_size a "
                f"positive int; got cfg={cfg!r}, image_size={image_size!r}. Fix: e.g. "
                "cfg=(32, 'M', 64, 'M'), image_size=28."
            )
        if image_size // 2 ** self.cfg.count("M") < 1:
            raise ValueError(
                f"cfg has {self.cfg.count('M')} poolings, which halve image_size={image_size} "
                "to nothing before fc1. Fix: fewer 'M' entries, or larger images."
            )
        for v in self.cfg:
            if v == "M":
                size //= 2
                continue
            convs.append(nnx.Conv(c, int(v), (3, 3), padding="SAME", rngs=rngs))
            bns.append(nnx.BatchNorm(int(v), rngs=rngs))
            c = int(v)
        self.convs, self.bns = nnx.List(convs), nnx.List(bns)
        self.fc1 = nnx.Linear(size * size * c, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for v in self.cfg:
            if v == "M":
                x = nnx.max_pool(x, (2, 2), (2, 2))
            else:
                x = jax.nn.relu(self.bns[i](self.convs[i](x)))
                i += 1
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))


class BasicBlock(nnx.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (a 1x1 conv + BN when the shape changes).

    Args:
      *args, **kwargs: the constructor's arguments below (flax nnx reports the class's
        signature as ``(*args, **kwargs)``).
      cin: the input channels.
      cout: the output channels of both convs.
      stride: the first conv's stride (1, or 2 to halve the resolution); with
        ``stride != 1`` or ``cin != cout`` the shortcut is a strided 1x1 conv + BN.
      rngs: the random number streams that initialize the layers (keyword-only).
    """

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(
            cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        if stride != 1 or cin != cout:
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(y + shortcut)


class ResNet20(nnx.Module):
    """ResNet-20 (He et al. 2016, https://arxiv.org/abs/1512.03385), 16/32/64 channels.

    A stem conv, three stages of three :class:`BasicBlock` s (the first block of
    stages 2 and 3 halves the resolution, with a 1x1 projection shortcut), global
    average pooling and a dense classifier; ``width`` sets the first stage's
    channels (the others take 2x and 4x).

    Args:
      *args, **kwargs: the constructor's arguments below, all keyword-only (flax nnx
        reports the class's signature as ``(*args, **kwargs)``).
      rngs: the random number streams that initialize the layers.
      in_channels: the input images' channels (default 1).
      num_classes: the number of logits (default 10).
      width: the channels of the stem and the first stage (default 16, the paper's).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune.models import ResNet20
      >>> # Shapes only (no initialization): the paper's 0.27M parameters.
      >>> abstract = nnx.eval_shape(lambda: ResNet20(rngs=nnx.Rngs(0)))
      >>> sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
      272186
      >>> [(b.conv1.kernel.shape[-1], b.proj is not None) for b in abstract.blocks[::3]]
      [(16, False), (32, True), (64, True)]
      >>> out = jax.eval_shape(lambda m, x: m(x), abstract, jnp.ones((2, 28, 28, 1)))
      >>> out.shape
      (2, 10)
    """

    def __init__(
        self, *, rngs: nnx.Rngs, in_channels: int = 1, num_classes: int = 10, width: int = 16
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
        blocks, c = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(c, cout, stride, rngs=rngs))
                c = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.head(jnp.mean(x, axis=(1, 2)))
