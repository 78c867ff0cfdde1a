"""Where a run's numbers and pictures go besides metrics.jsonl: W&B, TensorBoard, the local
dashboard, device peak FLOPs for MFU, and the patch pictures. Nothing here is imported by the model."""
