"""Model families: what each can compute (gradients, leaves, a linear fit), how it is
loaded, and how it is retrained for verification."""
