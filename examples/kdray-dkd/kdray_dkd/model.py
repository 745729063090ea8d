"""The example's own architecture: a perceptron with one hidden layer."""
import math

from torch import nn


def mlp(num_classes: int, input_shape: tuple, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
