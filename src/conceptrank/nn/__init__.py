"""PyTorch: model loading with preprocessing, small nets, layer hooks, devices, batched forward."""
