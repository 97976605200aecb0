"""Inputs: image decoding (images), preprocessing to pixel tensors (preprocess), tokenizers (tokenizers) and
the length-aware batching of texts (text_batches)."""
