"""What runs on the collective layer: DiLoCo, Streaming DiLoCo, federated strategies, gradient coding."""
