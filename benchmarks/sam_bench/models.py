"""The benchmarked networks and their data: the Keras models (an MLP and a
ResNet-8-style CNN) every Keras configuration and the JAX peer train, their
`torch.nn` twins for the torch peer, synthetic inputs and the trainable
weights' size.

    mlp      flatten, mlp_depth x Dense(mlp_width, relu), Dense(10)
    resnet   3x3 conv-BN stem of width resnet_width, then resnet_stages stages
             (width x 2**stage filters, stride 2 after the first) of one basic
             block each, global average pooling, Dense(10)

Keras and torch are imported inside the functions (a child process has picked
its backend by then).
"""

from .configs import INPUT_SHAPE, NUM_CLASSES


def build_keras_model(name, sizes):
    import keras
    from keras import layers

    inputs = keras.Input(INPUT_SHAPE)
    if name == "mlp":
        x = layers.Flatten()(inputs)
        for _ in range(sizes["mlp_depth"]):
            x = layers.Dense(sizes["mlp_width"], activation="relu")(x)
    elif name == "resnet":
        width = sizes["resnet_width"]

        def conv_bn(x, filters, kernel, strides=1):
            x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
            return layers.BatchNormalization()(x)

        x = layers.ReLU()(conv_bn(inputs, width, 3))
        for stage in range(sizes["resnet_stages"]):
            filters = width * 2**stage
            strides = 1 if stage == 0 else 2
            y = layers.ReLU()(conv_bn(x, filters, 3, strides))
            y = conv_bn(y, filters, 3)
            shortcut = x if strides == 1 and x.shape[-1] == filters else conv_bn(x, filters, 1, strides)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
        x = layers.GlobalAveragePooling2D()(x)
    else:
        raise ValueError(f"unknown model {name!r}")
    outputs = layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name=name)


def build_torch_model(name, sizes):
    import torch
    from torch import nn

    if name == "mlp":
        dims = [INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]] + [sizes["mlp_width"]] * sizes["mlp_depth"]
        modules = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            modules += [nn.Linear(a, b), nn.ReLU()]
        modules.append(nn.Linear(dims[-1], NUM_CLASSES))
        return nn.Sequential(*modules)

    width = sizes["resnet_width"]

    def conv_bn(cin, cout, kernel, strides=1):
        # Keras BatchNormalization defaults: momentum 0.99, epsilon 1e-3.
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride=strides, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
        )

    class Block(nn.Module):
        def __init__(self, cin, cout, strides):
            super().__init__()
            self.a = conv_bn(cin, cout, 3, strides)
            self.b = conv_bn(cout, cout, 3)
            self.shortcut = (
                nn.Identity() if strides == 1 and cin == cout else conv_bn(cin, cout, 1, strides)
            )

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(y + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(INPUT_SHAPE[2], width, 3)
            blocks, cin = [], width
            for stage in range(sizes["resnet_stages"]):
                cout = width * 2**stage
                blocks.append(Block(cin, cout, 1 if stage == 0 else 2))
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(cin, NUM_CLASSES)

        def forward(self, x):
            x = self.blocks(torch.relu(self.stem(x)))
            return self.head(x.mean(dim=(2, 3)))

    return ResNet()


def make_data(steps, batch_size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = steps * batch_size
    x = rng.standard_normal((n,) + INPUT_SHAPE).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(n,)).astype("int32")
    return x, y


def weight_info(template):
    import numpy as np

    count = sum(int(np.prod(v.shape)) for v in template.trainable_variables)
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in template.trainable_variables)
    return count, nbytes
