"""The built-in workloads: the paper's MNIST CNN and CIFAR-10's VGG16 and ResNet18."""
