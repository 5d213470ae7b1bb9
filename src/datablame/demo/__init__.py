"""The end-to-end demo: a tiny LoRA model trained here, a planted culprit traced back."""
